"""What max_pool2d stores for its backward: the selected tap of each window, in the smallest integer type.

Output ``(i, j)`` of a plane looks at the taps ``(p, q)``, ``p < kh``, ``q < kw``,
at input row ``i*sh - ph + p*dh`` and column ``j*sw - pw + q*dw``. The backward
only needs to know which tap won, so every backend stores the tap number::

    tap = p*kw + q        in [0, kh*kw)

in ``tap_dtype(kernel_size)``: uint8 while kh*kw <= 256 (every practical pool: a
2x2 window needs 2 bits), else uint16, else uint32. Against torch's flat int64
index ``r*W + c`` into the input plane that is 8x less memory to write in the
forward and to read in the backward. The flat index is still what
``F.max_pool2d(..., return_indices=True)`` returns (torch's semantics), computed
from the taps only when asked (``flat_indices``)::

    r*W + c = (i*sh - ph)*W + (j*sw - pw) + (p*dh*W + q*dw)
            = window origin of (i, j)      + offset of the tap in the plane

The same two terms let a backward find the input pixel of a tap without a division:
``tap_offsets`` tabulates the second one for the kh*kw taps.
"""
from __future__ import annotations

import numpy as np

__all__ = ["tap_dtype", "tap_offsets", "window_origins", "flat_indices"]


def tap_dtype(kernel_size):
    """The smallest unsigned integer type that holds every tap number p*kw + q < kh*kw."""
    taps = kernel_size[0] * kernel_size[1]
    for dtype in (np.uint8, np.uint16, np.uint32):
        if taps - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"max_pool2d: a window of {taps} taps needs more than 32-bit tap numbers")


def tap_offsets(width, kernel_size, dilation, xp=np):
    """offset[p*kw + q] = p*dh*W + q*dw: where tap (p, q) lies in the plane, relative to the window origin."""
    (kh, kw), (dh, dw) = kernel_size, dilation
    return (xp.arange(kh)[:, None] * (dh * width) + xp.arange(kw)[None, :] * dw).reshape(-1)


def window_origins(out_size, width, stride, padding, xp=np):
    """origin[i, j] = (i*sh - ph)*W + (j*sw - pw): the flat position of window (i, j)'s tap (0, 0) (maybe in the padding)."""
    rows = xp.arange(out_size[0]) * stride[0] - padding[0]
    cols = xp.arange(out_size[1]) * stride[1] - padding[1]
    return rows[:, None] * width + cols[None, :]


def flat_indices(taps, x_shape, kernel_size, stride, padding, dilation, xp=np):
    """torch's int64 indices r*W + c into the input plane, from the tap numbers (any array module ``xp``)."""
    width = x_shape[3]
    origins = window_origins(taps.shape[2:], width, stride, padding, xp)
    offsets = tap_offsets(width, kernel_size, dilation, xp)
    return (origins + offsets[taps.astype(xp.int64)]).astype(xp.int64)
