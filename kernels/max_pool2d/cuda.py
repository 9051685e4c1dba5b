"""max_pool2d on the GPU: Numba CUDA kernels, no atomics, deterministic.

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
* **backward v1** -- a scatter that is race-free by ownership: one thread per
  (n, c) plane zeroes its plane of gx, then walks the plane's outputs in order
  and adds ``gy[i, j]`` at ``indices[i, j]``. Overlapping windows (stride <
  kernel) may pick the same input pixel, but both adds then happen in the same
  thread, one after the other: no two threads ever write one address, so no
  atomics are needed, and the fixed order makes the sums deterministic. But
  N*C threads are too few for a GPU ((16, 64, 128, 128) has 1024 planes: 8
  blocks of 128 threads for an H100's 132 SMs), and each thread's writes walk its own plane,
  so a warp's 32 stores hit 32 different planes: uncoalesced.
* **backward v2** (default) -- first the case that needs no care: when windows
  do not overlap (stride >= the window's span d(k-1)+1 on both axes, e.g.
  2x2 stride 2) every input pixel lies in at most one window, so no two outputs
  can record the same index. A coalesced zero fill (one thread per gx
  element), then one thread per *output* element stores its gy at its
  recorded index: no two threads write one address, and the result does not
  depend on the order. When windows overlap, two outputs can pick the same
  pixel and their adds would race; atomics would make the float sum's order
  (and so its last bits) change from run to run. Instead a *gather*: one
  thread per input pixel (h, v) visits, in a fixed order, the outputs whose
  windows can contain it -- rows i with i*sh - ph <= h <= i*sh - ph + dh(kh-1),
  likewise columns -- and adds the gy of those whose index is (h, v). Each
  gx element is written once, by one thread (coalesced, no zero fill), and
  the sum's order is fixed: deterministic. Both need the window's geometry,
  so the backward interface carries kernel_size, stride, padding and dilation
  (the reference and cpu backends, which scatter in order, do not need them).
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
    """v1: thread e owns plane e = (n, c) of gx: zero it, then add each gy of the plane at its index."""
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


@cuda.jit
def _zero_kernel(flat):
    """Thread e: flat[e] = 0 (consecutive threads, consecutive addresses)."""
    e = cuda.grid(1)
    if e < flat.size:
        flat[e] = 0


@cuda.jit
def _scatter_kernel(gy, idx, gx):
    """v2, windows that do not overlap: thread e stores gy.flat[e] at its recorded index (owned by it alone)."""
    e = cuda.grid(1)
    if e >= gy.size:
        return
    _, c_n, ho, wo = gy.shape
    w_in = gx.shape[3]
    n, c, i, j = cc.unravel4(e, c_n, ho, wo)
    k = idx[n, c, i, j]
    gx[n, c, k // w_in, k % w_in] = gy[n, c, i, j]


@cuda.jit(device=True)
def _windows_containing(h, size_out, k, s, p, d):
    """(first, last) output rows (or columns) whose window's taps can include input row h."""
    first = max(0, -(-(h + p - d * (k - 1)) // s))  # ceil division; -(-a // b) also for a < 0
    last = min(size_out - 1, (h + p) // s)
    return first, last


@cuda.jit
def _gather_kernel(gy, idx, gx, kh, kw, sh, sw, ph, pw, dh, dw):
    """v2, overlapping windows: thread e sums, in (i, j) order, gy of the outputs that chose input pixel e."""
    e = cuda.grid(1)
    if e >= gx.size:
        return
    _, c_n, h_in, w_in = gx.shape
    _, _, ho, wo = gy.shape
    n, c, h, v = cc.unravel4(e, c_n, h_in, w_in)
    i0, i1 = _windows_containing(h, ho, kh, sh, ph, dh)
    j0, j1 = _windows_containing(v, wo, kw, sw, pw, dw)
    me = h * w_in + v
    acc = gx.dtype.type(0)
    for i in range(i0, i1 + 1):
        for j in range(j0, j1 + 1):
            if idx[n, c, i, j] == me:
                acc += gy[n, c, i, j]
    gx[n, c, h, v] = acc


def _backward_v1(gy, indices, gx, kernel_size, stride, padding, dilation):
    _backward_kernel[cc.blocks(gx.shape[0] * gx.shape[1], THREADS), THREADS](gy, indices, gx)


def _backward_v2(gy, indices, gx, kernel_size, stride, padding, dilation):
    spans = [dilation[a] * (kernel_size[a] - 1) + 1 for a in (0, 1)]
    if stride[0] >= spans[0] and stride[1] >= spans[1]:  # no two windows share a pixel
        _zero_kernel[cc.blocks(gx.size, THREADS), THREADS](gx.reshape(-1))
        _scatter_kernel[cc.blocks(gy.size, THREADS), THREADS](gy, indices, gx)
    else:
        _gather_kernel[cc.blocks(gx.size, THREADS), THREADS](gy, indices, gx, *kernel_size, *stride, *padding, *dilation)


BACKWARD_VERSIONS = {1: _backward_v1, 2: _backward_v2}
DEFAULT_BACKWARD_VERSION = 2  # statically better: N*C*H*W coalesced threads instead of N*C (no GPU timing yet)


def max_pool2d_backward(gy, indices, x_shape, kernel_size, stride, padding, dilation, version=DEFAULT_BACKWARD_VERSION):
    """gx (x_shape): gx[n, c].flat[indices[n, c, i, j]] += gy[n, c, i, j]; ``version`` of BACKWARD_VERSIONS."""
    gy = cc.as_input(gy)
    indices = cc.as_input(indices, np.int64)
    gx = cc.empty(tuple(x_shape), gy.dtype)
    BACKWARD_VERSIONS[version](gy, indices, gx, kernel_size, stride, padding, dilation)
    return gx


def _signatures(template):
    """PTX signatures for float32 and float64; {A} a C-contiguous (N, C, H, W) float array, {I} the same of int64."""
    return cc.float_signatures(template, A="{t}[:, :, :, ::1]", I="int64[:, :, :, ::1]")


PTX_SIGNATURES = [
    (_forward_kernel, _signatures("void({A}, {A}, {I}, " + ", ".join(["int64"] * 8) + ")")),  # 4 (h, w) pairs
    (_backward_kernel, _signatures("void({A}, {I}, {A})")),
    (_zero_kernel, _signatures("void({t}[::1])")),
    (_scatter_kernel, _signatures("void({A}, {I}, {A})")),
    (_gather_kernel, _signatures("void({A}, {I}, {A}, " + ", ".join(["int64"] * 8) + ")")),
]
