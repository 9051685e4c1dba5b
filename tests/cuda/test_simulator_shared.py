"""The simulator's shared arrays are one array per block, even when its threads race.

Numba's simulator allocates ``cuda.shared.array`` with an unlocked get-then-set,
so under load two threads of a block could get different arrays (minseg/runtime.py
explains and fixes it). This test hammers the first-allocation window: each launch
is a fresh kernel context, every thread writes its slot and thread 0 sums them.
"""
import sys

import numpy as np
from numba import cuda

from kernels import cuda_common as cc


@cuda.jit
def _sum_of_thread_ids(out):
    buf = cuda.shared.array(32, dtype=np.float64)
    t = cuda.threadIdx.x
    buf[t] = t
    cuda.syncthreads()
    if t == 0:
        acc = 0.0
        for k in range(32):
            acc += buf[k]
        out[cuda.blockIdx.x] = acc


def test_shared_array_is_shared_by_all_threads_of_a_block():
    assert not cc.SIMULATOR or getattr(cuda.simulator.kernelapi.FakeCUDAShared.array, "thread_safe", False)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to open the race window
    try:
        for _ in range(30):
            out = cc.empty((2,), np.float64)
            _sum_of_thread_ids[2, 32](out)
            np.testing.assert_array_equal(cc.xp.asnumpy(out) if cc.xp is not np else out, [496.0, 496.0])
    finally:
        sys.setswitchinterval(old)
