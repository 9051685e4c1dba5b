"""max_pool2d, the definition: the largest value of every window, and where it was.

Forward
-------
Output pixel (i, j) of every (n, c) plane looks at the window of kernel taps
``(p, q)``, ``p < kh``, ``q < kw``, at input rows and columns::

    r = i*sh - ph + p*dh,    s = j*sw - pw + q*dw

Taps outside the input (the padding) hold -inf and are never selected. Then::

    y[i, j]       = max over the window of x[r, s]
    indices[i, j] = p*kw + q of the selected tap (its number in the window, ``taps.py``)

The indices are stored in the smallest unsigned type that holds kh*kw - 1
(uint8 for any window up to 16x16); ``max_pool2d_indices`` turns them into
torch's flat int64 index r*W + s into the H*W plane, for ``return_indices``.

Which tap is selected follows torch's scan (rows, then columns, keeping a tap
when ``x > best or isnan(x)``):

* ties: the first maximum in scan order wins;
* NaN: a window with a NaN outputs NaN, at the index of its *last* NaN;
* a window whose in-image values are all -inf outputs -inf at its first
  in-image tap (never at a padding position).

``functional.py`` rejects configurations where a window holds only padding
(possible when the dilation exceeds the input size), for which torch returns an
index outside the plane.

Backward
--------
Within a window ``y = x[indices]``: locally (wherever the maximum is unique) the
output is a copy of one input, so ``dy[i, j]/dx[r, s] = 1`` for the selected tap
and 0 for the others. Summing over the outputs (windows overlap when the stride is
smaller than the kernel, and one input can be the maximum of several)::

    gx[n, c].flat[k] = sum over (i, j) whose selected tap lies at k of gy[n, c, i, j]

Inputs that are no window's maximum get 0. At a tie the function is not
differentiable; the gradient goes to the selected tap, as torch's does.
"""
from __future__ import annotations

import numpy as np

from kernels.max_pool2d.taps import flat_indices, tap_dtype
from kernels.shapes import pool_output_size

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "max_pool2d_indices"]


def _taps(n_out, stride, pad, dilation, kernel):
    """Input coordinate of tap t of output o along one axis: o*stride - pad + t*dilation, (n_out, kernel)."""
    return np.arange(n_out)[:, None] * stride - pad + np.arange(kernel)[None, :] * dilation


def max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode):
    """(y, indices): window maxima (N, C, Ho, Wo) and the number p*kw + q of each one's tap (``tap_dtype``)."""
    (kh, kw), (h, w) = kernel_size, x.shape[2:]
    ho, wo = (pool_output_size((h, w)[a], kernel_size[a], stride[a], padding[a], dilation[a], ceil_mode) for a in range(2))
    rows = _taps(ho, stride[0], padding[0], dilation[0], kh)[:, None, :, None]  # (Ho, 1, kh, 1)
    cols = _taps(wo, stride[1], padding[1], dilation[1], kw)[None, :, None, :]  # (1, Wo, 1, kw)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (Ho, Wo, kh, kw)
    # win[n, c, i, j, p*kw + q]: the window in scan order, padding as -inf
    win = np.where(inside, x[:, :, rows.clip(0, h - 1), cols.clip(0, w - 1)], -np.inf).astype(x.dtype)
    win = win.reshape(*win.shape[:4], kh * kw)
    inside = inside.reshape(ho, wo, kh * kw)

    best = win.max(axis=-1, keepdims=True)  # NaN if the window holds one
    first_max = np.argmax((win == best) & inside, axis=-1)
    last_nan = kh * kw - 1 - np.argmax(np.isnan(win[..., ::-1]), axis=-1)
    tap = np.where(np.isnan(best[..., 0]), last_nan, first_max)

    y = np.take_along_axis(win, tap[..., None], axis=-1)[..., 0]
    return y, tap.astype(tap_dtype(kernel_size))


def max_pool2d_backward(gy, indices, x_shape, kernel_size, stride, padding, dilation):
    """gx[n, c].flat[k] += gy[n, c, i, j], k the flat input position of window (i, j)'s selected tap.

    The window's geometry (pairs, as in the forward) places each tap; the cuda
    backend also uses it to pick a deterministic parallel strategy (``cuda.py``).
    """
    n, c, h, w = x_shape
    gx = np.zeros((n * c, h * w), gy.dtype)
    plane = np.arange(n * c)[:, None]
    flat = max_pool2d_indices(indices, x_shape, kernel_size, stride, padding, dilation)
    np.add.at(gx, (plane, flat.reshape(n * c, -1)), gy.reshape(n * c, -1))
    return gx.reshape(x_shape)


def max_pool2d_indices(indices, x_shape, kernel_size, stride, padding, dilation):
    """torch's flat int64 indices r*W + s into the input plane, from the forward's tap numbers."""
    return flat_indices(indices, x_shape, kernel_size, stride, padding, dilation)
