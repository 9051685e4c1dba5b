"""max_pool2d on the GPU: Numba CUDA kernels, no atomics.

Read ``reference.py`` first. Notation::

    x (N, C, H, W), y and indices (N, C, Ho, Wo); kernel (kh, kw), stride (sh, sw),
    padding (ph, pw), dilation (dh, dw). Output (i, j) reads the input pixels
        h = i*sh - ph + p*dh,   v = j*sw - pw + q*dw,   p < kh, q < kw
    that lie inside [0, H) x [0, W) (padding is -inf: never selected).

* **forward** -- one thread per output element scans its window and keeps the
  running maximum and its flat index ``h*W + v``. The update rule is torch's
  ``val > best or isnan(val)``: the first maximum wins on ties (a later equal
  value is not greater), and a NaN replaces anything, so NaN propagates (at the
  index of the window's last NaN). The index starts at the window's first
  in-bounds pixel, so a window of -inf reports that pixel, as torch.
  Consecutive threads take consecutive j, so their writes are coalesced; their
  reads are sw apart.
* **backward** -- a scatter that is race-free by ownership: one thread per
  (n, c) plane zeroes its plane of gx, then walks the plane's outputs in order
  and adds ``gy[i, j]`` at ``indices[i, j]``. Overlapping windows (stride <
  kernel) may pick the same input pixel, but both adds then happen in the same
  thread, one after the other: no two threads ever write one address, so no
  atomics are needed, and the fixed order makes the sums deterministic. A
  *gather* (one thread per input element, adding gy of the windows that chose
  it) would expose more parallelism, but finding those windows needs the
  kernel size, stride, padding and dilation, which the backward interface
  ``(gy, indices, x_shape)`` does not carry; with only N*C threads this kernel
  suits the many-channel, small-plane layers where pooling sits in a U-Net.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from kernels import cuda_common as cc

from kernels.shapes import pool_output_size

__all__ = ["max_pool2d_forward", "max_pool2d_backward"]

THREADS = 128


@cuda.jit
def _forward_kernel(x, y, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    """Thread e computes y.flat[e] and idx.flat[e] (j fastest, so writes are coalesced)."""
    e = cuda.grid(1)
    if e >= y.size:
        return
    _, c_n, ho, wo = y.shape
    h_in, w_in = x.shape[2], x.shape[3]
    n, c, i, j = cc.unravel4(e, c_n, ho, wo)
    h0 = i * sh - ph
    v0 = j * sw - pw
    # First in-bounds tap of each axis: the initial index, as torch, for windows of -inf.
    p0 = 0
    while h0 + p0 * dh < 0:
        p0 += 1
    q0 = 0
    while v0 + q0 * dw < 0:
        q0 += 1
    best = x.dtype.type(-np.inf)
    best_idx = (h0 + p0 * dh) * w_in + v0 + q0 * dw
    for p in range(p0, kh):
        h = h0 + p * dh
        if h >= h_in:
            break
        for q in range(q0, kw):
            v = v0 + q * dw
            if v >= w_in:
                break
            val = x[n, c, h, v]
            if val > best or val != val:  # strictly greater: first max wins; NaN always taken
                best = val
                best_idx = h * w_in + v
    y[n, c, i, j] = best
    idx[n, c, i, j] = best_idx


def max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode):
    """(y, indices): y (N, C, Ho, Wo) the window maxima, indices int64 flat h*W + w per plane."""
    x = cc.as_input(x)
    n, c = x.shape[:2]
    ho, wo = (pool_output_size(x.shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a], ceil_mode) for a in (0, 1))
    y = cc.empty((n, c, ho, wo), x.dtype)
    idx = cc.empty((n, c, ho, wo), np.int64)
    _forward_kernel[cc.blocks(y.size, THREADS), THREADS](x, y, idx, *kernel_size, *stride, *padding, *dilation)
    return y, idx


@cuda.jit
def _backward_kernel(gy, idx, gx):
    """Thread e owns plane e = (n, c) of gx: zero it, then add each gy of the plane at its index."""
    e = cuda.grid(1)
    _, c_n, h_in, w_in = gx.shape
    if e >= gx.shape[0] * c_n:
        return
    n = e // c_n
    c = e % c_n
    zero = gx.dtype.type(0)
    for h in range(h_in):
        for v in range(w_in):
            gx[n, c, h, v] = zero
    for i in range(gy.shape[2]):
        for j in range(gy.shape[3]):
            k = idx[n, c, i, j]
            gx[n, c, k // w_in, k % w_in] += gy[n, c, i, j]


def max_pool2d_backward(gy, indices, x_shape):
    """gx (x_shape): gx[n, c].flat[indices[n, c, i, j]] += gy[n, c, i, j], one thread per plane."""
    gy = cc.as_input(gy)
    indices = cc.as_input(indices, np.int64)
    gx = cc.empty(tuple(x_shape), gy.dtype)
    _backward_kernel[cc.blocks(x_shape[0] * x_shape[1], THREADS), THREADS](gy, indices, gx)
    return gx


def _signatures(template):
    """PTX signatures for float32 and float64; {A} a C-contiguous (N, C, H, W) float array, {I} the same of int64."""
    return cc.float_signatures(template, A="{t}[:, :, :, ::1]", I="int64[:, :, :, ::1]")


PTX_SIGNATURES = [
    (_forward_kernel, _signatures("void({A}, {A}, {I}, " + ", ".join(["int64"] * 8) + ")")),  # 4 (h, w) pairs
    (_backward_kernel, _signatures("void({A}, {I}, {A})")),
]
