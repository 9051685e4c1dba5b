"""interpolate_cat on the GPU: the resize's kernel, then cat's, launched one after the other.

On a GPU the launches are asynchronous (the Python between them hides behind GPU work), so this
keeps the interface and composes (see ``reference.py``); writing the resize into y's channels
directly, as the cpu backend does, would also save the copy of u here.
"""
from __future__ import annotations

from kernels.cat.cuda import cat_backward, cat_forward
from kernels.interpolate.cuda import interpolate_backward, interpolate_forward
from kernels.interpolate_cat.reference import composed_backward, composed_forward

__all__ = ["interpolate_cat_forward", "interpolate_cat_backward"]

PTX_SIGNATURES: list = []  # no kernels of its own


def interpolate_cat_forward(skip, x, out_size, mode, align_corners, scales):
    """y = cat([skip, the resize of x], 1) (see the reference)."""
    return composed_forward(cat_forward, interpolate_forward, skip, x, out_size, mode, align_corners, scales)


def interpolate_cat_backward(gy, skip_channels, x_shape, mode, align_corners, scales, needs):
    """(g_skip, gx) (see the reference)."""
    return composed_backward(cat_backward, interpolate_backward, gy, skip_channels, x_shape, mode, align_corners, scales, needs)
