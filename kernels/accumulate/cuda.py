"""accumulate on the GPU: one grid-stride pass, in place.

Read ``reference.py`` first for the math. Thread e adds elements e, e + G, e + 2G, ...
of the flat arrays (G threads in the grid), so a warp reads and writes 32 consecutive
addresses: coalesced, one pass over memory. The grid is capped at ``MAX_BLOCKS``
blocks and strides over larger arrays, as ``kernels/sgd/cuda.py`` does.

``total`` is written in place: it must be a C-contiguous array of the device already
(a CuPy array on a GPU; a NumPy array under the simulator, which copies it to its fake
device and back after the launch, so the write lands in it too), never a copy.
``part`` is only read, so ``cc.as_input`` may copy it.

Exactness: one addition per element is one rounding, and there is no product for
NVVM to fuse into a multiply-add, so on a GPU too the result equals the reference
bit for bit.
"""
from __future__ import annotations

from numba import cuda

from kernels import cuda_common as cc

__all__ = ["accumulate"]

THREADS = 256
# An estimate, not a timing: 4 blocks of 256 threads per SM of a 132-SM H100, as in
# kernels/sgd/cuda.py (a streaming kernel with even fewer registers per thread).
MAX_BLOCKS = 4 * 132


@cuda.jit
def _accumulate_kernel(total, part):
    """Thread e adds elements e, e + G, ... (G = the grid's threads)."""
    for e in range(cuda.grid(1), total.size, cuda.gridsize(1)):
        total[e] += part[e]


def accumulate(total, part):
    """``total += part`` in place, one launch; returns None.

    ``total`` is a C-contiguous array of the device (written), ``part`` of the same shape
    and dtype (only read).
    """
    t = total.reshape(-1)
    p = cc.as_input(part).reshape(-1)
    blocks = min(cc.blocks(t.size, THREADS), MAX_BLOCKS)
    _accumulate_kernel[blocks, THREADS](t, p)


PTX_SIGNATURES = [
    (_accumulate_kernel, cc.float_signatures("void({t}[::1], {t}[::1])")),
]
