"""cat on the GPU: one Numba CUDA thread per element of a band of columns.

Read ``reference.py`` first for the math and ``columns.py`` for the 2-D view: every
piece fills one band of columns in every row of the output. The launch is 2-D and
follows the band: blocks of 32 columns x 8 rows, so each warp copies 32 consecutive
columns of one row (its reads and writes coalesce) and no thread divides to find its
row (a 64-bit division per element would cost more than the copy). A band narrower
than 32 columns (thin pieces joined along the last axis) leaves most of each warp idle;
a U-Net's channel joins are thousands of columns wide. Pure memory traffic.
"""
from __future__ import annotations

import math

from numba import cuda

from kernels import cuda_common as cc

from .columns import as_rows, bands, piece_shape

__all__ = ["cat_forward", "cat_backward"]

TILE = (32, 8)  # threads per block: 32 columns (one warp) x 8 rows
ROWS_PER_LAUNCH = 65535 * TILE[1]  # CUDA's limit on the grid's second dimension, in rows


@cuda.jit
def _copy_band_kernel(src, src_col, dst, dst_col, width, row0):
    """dst[r, dst_col + c] = src[r, src_col + c] for the thread's column c and row r (from row0)."""
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = row0 + cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    if c < width and r < src.shape[0]:
        dst[r, dst_col + c] = src[r, src_col + c]


def _copy_band(src, src_col, dst, dst_col, width):
    # One element per thread, no loop: a loop over rows would make LLVM divide to count
    # its trips, per thread -- per element here. Taller bands take several launches.
    rows = src.shape[0]
    for row0 in range(0, rows if width else 0, ROWS_PER_LAUNCH):
        grid = (cc.blocks(width, TILE[0]), cc.blocks(min(rows - row0, ROWS_PER_LAUNCH), TILE[1]))
        _copy_band_kernel[grid, TILE](src, src_col, dst, dst_col, width, row0)


def cat_forward(arrays, dim):
    """y = the arrays joined along ``dim``, each piece copied into its band of y's columns."""
    arrays = [cc.as_input(a) for a in arrays]
    first = arrays[0]
    y = cc.empty(piece_shape(first.shape, dim, sum(a.shape[dim] for a in arrays)), first.dtype)
    y_rows = as_rows(y, dim)
    for a, (col, width) in zip(arrays, bands([a.shape[dim] for a in arrays], math.prod(first.shape[dim + 1:]))):
        _copy_band(as_rows(a, dim), 0, y_rows, col, width)
    return y


def cat_backward(gy, sizes, dim, needs):
    """The band of gy's columns of every piece that needs a gradient, copied into a fresh array."""
    gy = cc.as_input(gy)
    gy_rows = as_rows(gy, dim)
    pieces = []
    for n, need, (col, width) in zip(sizes, needs, bands(sizes, math.prod(gy.shape[dim + 1:]))):
        piece = cc.empty(piece_shape(gy.shape, dim, n), gy.dtype) if need else None
        if need:
            _copy_band(gy_rows, col, as_rows(piece, dim), 0, width)
        pieces.append(piece)
    return tuple(pieces)


PTX_SIGNATURES = [
    (_copy_band_kernel, cc.float_signatures("void({A}, int64, {A}, int64, int64, int64)", A="{t}[:, ::1]")),
]
