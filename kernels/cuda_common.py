"""What every ``kernels/<op>/cuda.py`` shares: array module, allocation, launch sizes.

On a GPU the cuda backend's arrays are CuPy arrays, handed to Numba kernels
through ``__cuda_array_interface__`` (no copies). Without a GPU, Numba's CUDA
simulator runs the same kernels on NumPy arrays: every CUDA thread becomes a
Python thread, so keep test launches to about 10k threads.

Every cuda.py module lists its kernels with the signatures they must compile
for in ``PTX_SIGNATURES`` -- ``[(kernel, ["void(float32[:, ::1], ...)", ...]), ...]``
-- and ``tests/cuda/test_ptx.py`` compiles each of them to PTX for sm_80 and
sm_90 with the simulator off, because the simulator happily runs Python that
real CUDA rejects. ``python -m benchmarks.ptx_report`` does the same compile
and prints each kernel's registers, spills and shared memory.

Under the simulator, ``minseg.runtime.fix_simulator_shared_arrays`` (applied when
the cuda backend loads, and by the tests) makes ``cuda.shared.array`` thread-safe.

The simulator copies NumPy arguments to fake device arrays and back after the
launch (so a kernel's writes appear in the caller's arrays), and refuses
non-contiguous arrays: pass everything through ``as_input``.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)


if SIMULATOR:
    xp = np
else:  # a real GPU: arrays live in CuPy
    try:
        import cupy as xp
    except ImportError:  # compile-only use (PTX checks) without CuPy
        xp = np

# Poison fresh outputs (NaN for floats, a huge value for ints) so a kernel that
# forgets to write an element fails its test instead of passing on zeros that
# happened to be in memory. Always on under the simulator; MINSEG_POISON=1 turns
# it on for a real GPU run of the tests.
POISON = SIMULATOR or os.environ.get("MINSEG_POISON") == "1"


def empty(shape, dtype):
    """A fresh output array (poisoned when POISON is set)."""
    out = xp.empty(shape, dtype=dtype)
    if POISON:
        out.fill(np.nan if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max)
    return out


def zeros(shape, dtype):
    return xp.zeros(shape, dtype=dtype)


def as_input(a, dtype=None):
    """A C-contiguous device array of ``dtype`` (kernels index flat memory)."""
    a = xp.asarray(a)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return xp.ascontiguousarray(a)


def blocks(n: int, threads: int) -> int:
    """Number of blocks so that blocks*threads >= n (the last block is partial)."""
    return max(1, math.ceil(n / threads))


def float_signatures(template: str, **arrays: str) -> list[str]:
    """PTX signatures of ``template`` for float32 and for float64.

    ``{t}`` in the template is the float type; every keyword names another
    placeholder, itself written with ``{t}`` (e.g. ``A="{t}[:, :, :, ::1]"``, a
    C-contiguous 4-D array of the float type).
    """
    return [template.format(t=t, **{k: v.format(t=t) for k, v in arrays.items()}) for t in ("float32", "float64")]


def reduce_threads(terms: int, largest: int) -> int:
    """Block size of a block reduction over ``terms`` values: a power of two in [32, largest].

    A block no larger than the work leaves no threads idle on short reductions
    (and keeps the simulator, one Python thread per CUDA thread, fast); ``largest``
    is the size of the kernel's shared buffer.
    """
    if SIMULATOR:
        # One Python thread per CUDA thread, and a barrier costs a switch per
        # thread: the smallest block (one warp) switches through 4x fewer threads
        # per barrier than a 128-thread block, and has 2 barriers fewer (an
        # estimate from the thread counts, not a timing). The code path is
        # identical for any size.
        return 32
    threads = 32
    while threads < min(terms, largest):
        threads *= 2
    return threads


@cuda.jit(device=True)
def unravel4(e, d1, d2, d3):
    """(a, b, c, d) with e = ((a*d1 + b)*d2 + c)*d3 + d: a flat C-order index of a 4-D array.

    One thread per element numbers the elements in memory order, so neighbouring
    threads touch neighbouring addresses (coalesced) and every kernel maps its
    thread index back to coordinates the same way.
    """
    return e // (d3 * d2 * d1), (e // (d3 * d2)) % d1, (e // d3) % d2, e % d3


@cuda.jit(device=True)
def unravel3(e, d1, d2):
    """(a, b, c) with e = (a*d1 + b)*d2 + c: a flat C-order index of a 3-D array."""
    return e // (d2 * d1), (e // d2) % d1, e % d2


@cuda.jit(device=True)
def block_sum(value, buf):
    """Sum of ``value`` over the threads of a 1-D block, returned to every thread.

    ``buf`` is a shared array with one slot per thread (blockDim.x a power of two).
    Tree reduction: each step adds the upper half of ``buf`` onto the lower half,
    log2(blockDim.x) steps with a barrier after each. The barrier after reading
    the total lets a kernel call block_sum again with the same ``buf``.
    """
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if t < half:
            buf[t] += buf[t + half]
        cuda.syncthreads()
        half //= 2
    total = buf[0]
    cuda.syncthreads()
    return total
