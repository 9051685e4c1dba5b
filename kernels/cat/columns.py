"""The 2-D view through which cat's cpu and cuda kernels copy (reference.py needs none).

A C-contiguous array of shape (d_0, ..., d_dim, ..., d_last) is, in memory, ``rows =
d_0 * ... * d_(dim-1)`` runs of ``d_dim * inner`` numbers, ``inner = d_(dim+1) * ... * d_last``.
Joining arrays along ``dim`` lays these runs side by side: piece i fills the same band of
columns ``[o_i * inner, (o_i + n_i) * inner)`` in every row of the output, o_i being the
sum of the sizes before it. So the forward and the backward are the same copy, one band
of columns per piece, in opposite directions.
"""
from __future__ import annotations

import math


def as_rows(a, dim: int):
    """``a`` (C-contiguous) as a 2-D view (rows, columns), the axes before ``dim`` making the rows."""
    return a.reshape(math.prod(a.shape[:dim]), math.prod(a.shape[dim:]))


def bands(sizes, inner: int) -> list[tuple[int, int]]:
    """(first column, width) of each piece of ``sizes`` along the axis, ``inner`` numbers per step of it."""
    out, offset = [], 0
    for n in sizes:
        out.append((offset * inner, n * inner))
        offset += n
    return out


def piece_shape(shape, dim: int, n: int) -> tuple:
    """``shape`` with ``n`` along ``dim``."""
    return tuple(shape[:dim]) + (n,) + tuple(shape[dim + 1:])
