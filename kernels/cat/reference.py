"""Concatenation: the NumPy definition.

Forward, pieces x_1, ..., x_k of equal shape except along ``dim``, where x_i has n_i entries::

    y[..., o_i + j, ...] = x_i[..., j, ...]     0 <= j < n_i,   o_i = n_1 + ... + n_(i-1)

Backward: y is a copy in which every element of y is one element of one x_i, so
dL/dx_i[..., j, ...] = dL/dy[..., o_i + j, ...]: each piece's gradient is the band of
the upstream gradient it was copied to (the adjoint of copying into disjoint places is
reading back from them)::

    gx_i = gy[..., o_i : o_i + n_i, ...]

A network joins its skip connections this way (a U-Net concatenates the encoder's
maps with the upsampled decoder's along the channels): pure memory traffic, one read
and one write of every element each way. The backward returns every piece as an
array of its own (C-contiguous, as every kernel's input must be), so the op that
receives it needs no copy of its own.
"""
from __future__ import annotations

import numpy as np

__all__ = ["cat_forward", "cat_backward"]


def cat_forward(arrays, dim):
    """y = the arrays (a sequence, one dtype, equal shapes except along ``dim``) joined along ``dim``."""
    return np.concatenate(arrays, axis=dim)


def cat_backward(gy, sizes, dim, needs):
    """(gx_1, ..., gx_k): ``gy`` cut along ``dim`` into pieces of ``sizes``, each a fresh
    C-contiguous array, or None where ``needs[i]`` is false (no gradient wanted)."""
    pieces = np.split(gy, np.cumsum(sizes)[:-1], axis=dim)
    return tuple(piece.copy() if need else None for piece, need in zip(pieces, needs))
