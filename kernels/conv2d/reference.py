"""conv2d, the definition: forward and the three gradients in vectorised NumPy.

Forward (cross-correlation, as torch)
-------------------------------------
Pad x with zeros to ``xp`` (``pt`` rows on top, ``pb`` at the bottom, ``pl`` / ``pr``
columns left / right). Split the C_in input and C_out output channels into ``G``
groups of ``Cg = C_in/G`` and ``Og = C_out/G``; output channel ``o`` of group ``g``
only sees the input channels of group ``g``::

    y[n, g*Og + o, i, j] = b[g*Og + o]
        + sum_{c < Cg, p < kh, q < kw} w[g*Og + o, c, p, q] * xp[n, g*Cg + c, i*sh + p*dh, j*sw + q*dw]

    Ho = (H + pt + pb - dh*(kh - 1) - 1) // sh + 1        (Wo likewise)

For fixed (n, g, i, j) the sum is a dot product between the weights and one
*window* of xp. ``_windows`` builds all windows at once as a strided view
``win[n, g, c, i, j, p, q] = xp[n, g*Cg + c, i*sh + p*dh, j*sw + q*dw]`` (no copy),
so forward is one contraction per group: ``y = einsum('gocpq,ngcijpq->ngoij')``.

Backward
--------
Let ``gy = dL/dy``. y is linear in each of x, w and b, so every gradient is the
sum of ``gy`` times the coefficient that multiplies the variable in the formula:

* bias: ``b[o]`` enters every ``y[n, o, i, j]`` with coefficient 1::

      gb[o] = sum_{n, i, j} gy[n, o, i, j]

* weight: ``w[o, c, p, q]`` multiplies ``xp[n, c', i*sh + p*dh, j*sw + q*dw]`` in
  ``y[n, o, i, j]`` (c' = g*Cg + c), i.e. the same windows as the forward::

      gw[g*Og + o, c, p, q] = sum_{n, i, j} gy[n, g*Og + o, i, j] * win[n, g, c, i, j, p, q]

* input: ``xp[n, c', r, s]`` appears in ``y[n, o, i, j]`` for every tap (p, q) with
  ``r = i*sh + p*dh`` and ``s = j*sw + q*dw``, with coefficient ``w[o, c, p, q]``.
  Summing over those outputs, tap by tap::

      gxp[n, c', i*sh + p*dh, j*sw + q*dw] += sum_{o in group} w[o, c, p, q] * gy[n, o, i, j]

  for every (p, q): first contract over o (``cols = einsum('gocpq,ngoij->ngcijpq')``),
  then scatter-add each tap's (Ho, Wo) plane into a strided slice of ``gxp``. The
  gradient of x is ``gxp`` with the padding cut off (padding is a constant, not a
  variable). Pixels that no window reaches (the bottom/right rows and columns
  that ``//`` drops when the stride does not fit, or gaps of a dilated kernel
  with stride > 1) never receive a contribution: their gradient is 0.

Transposed convolution
----------------------
``conv2d_grad_input`` is the adjoint of ``x -> conv2d(x, w)``: for all x and g,
``<conv2d(x, w), g> = <x, conv2d_grad_input(g, w)>``. ``conv_transpose2d(x, w)`` is
defined as exactly that adjoint map, applied to x as if x were an output
gradient: it spreads each input pixel over a kernel-sized patch of a larger
image. ``functional.py`` therefore builds it from these kernels with the roles
of input and output swapped: its forward is ``conv2d_grad_input(x, w, out_shape)``
(w is (C_in, C_out/G, kh, kw), which is a conv2d weight from the large image's
C_out channels to x's C_in channels), its input gradient is the adjoint of the
adjoint, ``conv2d_forward(gy, w)``, and its weight gradient is
``conv2d_grad_weight(gy, x, w.shape)``.

``conv2d_grad_input`` and ``conv2d_grad_weight`` take Ho, Wo from ``gy``. It may
be smaller than the formula above (conv_transpose2d with output_padding >=
stride, allowed when dilation > stride): the outputs it lacks count as 0.
"""
from __future__ import annotations

import numpy as np

from kernels.shapes import conv_output_size

__all__ = ["conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight", "conv2d_grad_bias"]


def _pad(x, padding):
    """x zero-padded by ((top, bottom), (left, right)) in H and W."""
    return np.pad(x, ((0, 0), (0, 0), *padding))


def _windows(xp, groups, k, out_hw, stride, dilation):
    """Read-only view win[n, g, c, i, j, p, q] = xp[n, g*Cg + c, i*sh + p*dh, j*sw + q*dw]."""
    n, c_in, _, _ = xp.shape
    s_n, s_c, s_h, s_w = xp.strides
    return np.lib.stride_tricks.as_strided(
        xp,
        shape=(n, groups, c_in // groups, *out_hw, *k),
        strides=(s_n, s_c * (c_in // groups), s_c, s_h * stride[0], s_w * stride[1], s_h * dilation[0], s_w * dilation[1]),
        writeable=False,
    )


def _grouped(w, groups):
    """w (C_out, Cg, kh, kw) as (G, Og, Cg, kh, kw)."""
    return w.reshape(groups, w.shape[0] // groups, *w.shape[1:])


def conv2d_forward(x, w, b, stride, padding, dilation, groups):
    """y (N, C_out, Ho, Wo) = b + sum over the group's channels and the kernel taps of w * window(x)."""
    n, _, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    ho = conv_output_size(h, sum(padding[0]), dilation[0], kh, stride[0])
    wo = conv_output_size(wd, sum(padding[1]), dilation[1], kw, stride[1])
    win = _windows(_pad(x, padding), groups, (kh, kw), (ho, wo), stride, dilation)
    y = np.einsum("gocpq,ngcijpq->ngoij", _grouped(w, groups), win, optimize=True)
    y = y.reshape(n, c_out, ho, wo).astype(x.dtype, copy=False)
    if b is not None:
        y += b.reshape(1, c_out, 1, 1)
    return np.ascontiguousarray(y)


def conv2d_grad_input(gy, w, x_shape, stride, padding, dilation, groups):
    """gx (x_shape): each tap (p, q) scatter-adds w[., ., p, q]^T gy into the strided slice of x it read."""
    n, c_in, h, wd = x_shape
    _, _, ho, wo = gy.shape
    kh, kw = w.shape[2:]
    (pt, pb), (pl, pr) = padding
    gy_g = gy.reshape(n, groups, -1, ho, wo)
    cols = np.einsum("gocpq,ngoij->ngcijpq", _grouped(w, groups), gy_g, optimize=True).reshape(n, c_in, ho, wo, kh, kw)
    gxp = np.zeros((n, c_in, h + pt + pb, wd + pl + pr), dtype=gy.dtype)
    for p in range(kh):
        for q in range(kw):
            r, s = p * dilation[0], q * dilation[1]
            gxp[:, :, r : r + stride[0] * (ho - 1) + 1 : stride[0], s : s + stride[1] * (wo - 1) + 1 : stride[1]] += cols[..., p, q]
    return np.ascontiguousarray(gxp[:, :, pt : pt + h, pl : pl + wd])


def conv2d_grad_weight(x, gy, w_shape, stride, padding, dilation, groups):
    """gw (w_shape) = sum over n, i, j of gy times the window that the forward multiplied by w."""
    n, _, ho, wo = gy.shape
    win = _windows(_pad(x, padding), groups, w_shape[2:], (ho, wo), stride, dilation)
    gy_g = gy.reshape(n, groups, -1, ho, wo)
    gw = np.einsum("ngoij,ngcijpq->gocpq", gy_g, win, optimize=True)
    return np.ascontiguousarray(gw.reshape(w_shape).astype(gy.dtype, copy=False))


def conv2d_grad_bias(gy):
    """gb (C_out,) = gy summed over batch, rows and columns."""
    return gy.sum(axis=(0, 2, 3))
