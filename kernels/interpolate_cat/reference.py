"""A resize joined after a skip connection's channels, as one call: a U-Net decoder's input.

Nothing new to derive: the op is the composition of two others, and each keeps its own math
(``kernels/interpolate/reference.py``, ``kernels/cat/reference.py``)::

    u = interpolate(x, out_size, mode, align_corners, scales)        (N, C_x, Ho, Wo)
    y = cat([skip, u], dim=1)                                         (N, C_s + C_x, Ho, Wo)

Backward is each op's adjoint, in reverse: cat's hands every piece the band of gy it was copied
to, and the resize's adjoint takes u's band::

    dL/dskip = gy[:, :C_s]          dL/dx = interpolate_backward(gy[:, C_s:])

Why fused: as two calls, u is written to an array of its own, then read back and copied into y
(a pass over memory each way, and Python between two kernels). As one call, a backend can write
the resize straight into its channels of y, and read gy's channels where they are in the
backward (the cpu backend does): u never exists, and the copies are only the skip's.
"""
from __future__ import annotations

from kernels.cat.reference import cat_backward, cat_forward
from kernels.interpolate.reference import interpolate_backward, interpolate_forward

__all__ = ["interpolate_cat_forward", "interpolate_cat_backward"]


def composed_forward(cat_forward, interpolate_forward, skip, x, out_size, mode, align_corners, scales):
    """``interpolate_cat_forward`` from a backend's two ops (the backends without a fused version use it)."""
    return cat_forward([skip, interpolate_forward(x, out_size, mode, align_corners, scales)], 1)


def composed_backward(cat_backward, interpolate_backward, gy, skip_channels, x_shape, mode, align_corners, scales, needs):
    """``interpolate_cat_backward`` from a backend's two ops."""
    g_skip, g_u = cat_backward(gy, (skip_channels, gy.shape[1] - skip_channels), 1, needs)
    return g_skip, interpolate_backward(g_u, x_shape, mode, align_corners, scales) if needs[1] else None


def interpolate_cat_forward(skip, x, out_size, mode, align_corners, scales):
    """y = ``cat_forward([skip, interpolate_forward(x, out_size, mode, align_corners, scales)], 1)``: skip
    (N, C_s, Ho, Wo) and x (N, C_x, H, W) of one dtype, ``out_size`` = (Ho, Wo)."""
    return composed_forward(cat_forward, interpolate_forward, skip, x, out_size, mode, align_corners, scales)


def interpolate_cat_backward(gy, skip_channels, x_shape, mode, align_corners, scales, needs):
    """(g_skip, gx): gy's first ``skip_channels`` channels (a fresh array) and ``interpolate_backward`` of the
    rest (x of ``x_shape``); ``needs`` = (g_skip, gx) wanted, None where not."""
    return composed_backward(cat_backward, interpolate_backward, gy, skip_channels, x_shape, mode, align_corners, scales, needs)
