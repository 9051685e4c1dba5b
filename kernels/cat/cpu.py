"""cat on the CPU: a parallel Numba copy of bands of columns.

Read ``reference.py`` first for the math and ``columns.py`` for the 2-D view: every
piece fills one band of columns in every row of the output. A single ``np.concatenate``
copies on one core; the copy here cuts every row's band into blocks of about
``BLOCK`` numbers and lets ``prange`` share the blocks between the threads, so the
copy runs at the memory bandwidth of all the cores. Each element is read once and
written once; nothing else would make a copy faster.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .columns import as_rows, bands, piece_shape

__all__ = ["cat_forward", "cat_backward"]

# Numbers per parallel block: 64 KiB of float32, large enough that a block's
# scheduling cost is small next to its copy, small enough that the (N, C*H*W)
# rows of a batch split into many blocks for the threads to share.
BLOCK = 1 << 14


@njit(parallel=True, cache=True)
def _copy_band(src, src_col, dst, dst_col, width):
    """dst[r, dst_col : dst_col + width] = src[r, src_col : src_col + width] for every row r."""
    per_row = (width + BLOCK - 1) // BLOCK
    for b in prange(src.shape[0] * per_row):
        r, k = b // per_row, b % per_row
        lo, hi = k * width // per_row, (k + 1) * width // per_row
        dst[r, dst_col + lo : dst_col + hi] = src[r, src_col + lo : src_col + hi]


def cat_forward(arrays, dim):
    """y = the arrays joined along ``dim``, each piece copied into its band of y's columns."""
    first = arrays[0]
    y = np.empty(piece_shape(first.shape, dim, sum(a.shape[dim] for a in arrays)), first.dtype)
    inner = math.prod(first.shape[dim + 1:])
    y_rows = as_rows(y, dim)
    for a, (col, width) in zip(arrays, bands([a.shape[dim] for a in arrays], inner)):
        _copy_band(as_rows(a, dim), 0, y_rows, col, width)
    return y


def cat_backward(gy, sizes, dim, needs):
    """The band of gy's columns of every piece that needs a gradient, copied into a fresh array."""
    inner = math.prod(gy.shape[dim + 1:])
    gy_rows = as_rows(gy, dim)
    pieces = []
    for n, need, (col, width) in zip(sizes, needs, bands(sizes, inner)):
        piece = np.empty(piece_shape(gy.shape, dim, n), gy.dtype) if need else None
        if need:
            _copy_band(gy_rows, col, as_rows(piece, dim), 0, width)
        pieces.append(piece)
    return tuple(pieces)
