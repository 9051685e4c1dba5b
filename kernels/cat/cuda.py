"""cat on the GPU: one Numba CUDA thread per element of a band of columns.

Read ``reference.py`` first for the math and ``columns.py`` for the 2-D view: every
piece fills one band of columns in every row of the output. Thread e copies element
(r, c) of the band, ``r = e // width``, ``c = e % width``: consecutive threads touch
consecutive addresses within a row, so a warp's reads and writes coalesce (a warp
that straddles two rows makes two transactions instead of one). Pure memory traffic.
"""
from __future__ import annotations

import math

from numba import cuda

from kernels import cuda_common as cc

from .columns import as_rows, bands, piece_shape

__all__ = ["cat_forward", "cat_backward"]

THREADS = 256


@cuda.jit
def _copy_band_kernel(src, src_col, dst, dst_col, width):
    """dst[r, dst_col + c] = src[r, src_col + c] for the element (r, c) of thread e."""
    e = cuda.grid(1)
    if e < src.shape[0] * width:
        r = e // width
        c = e - r * width
        dst[r, dst_col + c] = src[r, src_col + c]


def _copy_band(src, src_col, dst, dst_col, width):
    n = src.shape[0] * width
    if n:
        _copy_band_kernel[cc.blocks(n, THREADS), THREADS](src, src_col, dst, dst_col, width)


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
    (_copy_band_kernel, cc.float_signatures("void({A}, int64, {A}, int64, int64)", A="{t}[:, ::1]")),
]
