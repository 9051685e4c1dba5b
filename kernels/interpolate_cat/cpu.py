"""interpolate_cat on the CPU: the resize written straight into its channels of the output.

Read ``reference.py`` first. y (N, C_s + C_x, Ho, Wo) is allocated once; cat's parallel copy
(``kernels/cat/cpu.py``, ``_copy_band``) fills the skip's channels, and the resize's kernels
(``kernels/interpolate/cpu.py``, ``interpolate_into``) write the resized planes of x into the
channels after them -- plane (n, c) of x into y[n, C_s + c], a whole contiguous plane each. The
backward copies the skip's band of gy out and runs the resize's adjoint on the rest of gy in
place (``interpolate_backward_from``). The same kernels as the two ops' own, on the same values,
so the result is theirs bit for bit; what goes is the intermediate array u (C_x planes written,
then read and copied: 2/3 of a U-Net decoder's cat traffic) and a return to Python each way.
"""
from __future__ import annotations

import math

import numpy as np

from kernels.cat.columns import as_rows
from kernels.cat.cpu import _copy_band
from kernels.interpolate.cpu import interpolate_backward_from, interpolate_into

__all__ = ["interpolate_cat_forward", "interpolate_cat_backward"]


def interpolate_cat_forward(skip, x, out_size, mode, align_corners, scales):
    """y = cat([skip, the resize of x], 1) (see the reference)."""
    n, c_skip = skip.shape[:2]
    y = np.empty((n, c_skip + x.shape[1], *out_size), x.dtype)
    _copy_band(as_rows(skip, 1), 0, as_rows(y, 1), 0, math.prod(skip.shape[1:]))
    interpolate_into(y, c_skip, x, mode, align_corners, scales)
    return y


def interpolate_cat_backward(gy, skip_channels, x_shape, mode, align_corners, scales, needs):
    """(g_skip, gx) (see the reference): the skip's band of gy copied out; the resize's adjoint reads
    the rest of gy where it is."""
    g_skip = None
    if needs[0]:
        g_skip = np.empty((gy.shape[0], skip_channels, *gy.shape[2:]), gy.dtype)
        _copy_band(as_rows(gy, 1), 0, as_rows(g_skip, 1), 0, math.prod(g_skip.shape[1:]))
    gx = interpolate_backward_from(gy, skip_channels, x_shape, mode, align_corners, scales) if needs[1] else None
    return g_skip, gx
