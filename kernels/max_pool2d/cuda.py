"""max_pool2d on the GPU: Numba CUDA kernels, no atomics, deterministic.

Read ``reference.py`` first. Notation::

    x (N, C, H, W), y and indices (N, C, Ho, Wo); kernel (kh, kw), stride (sh, sw),
    padding (ph, pw), dilation (dh, dw). Output (i, j) reads the input pixels
        h = i*sh - ph + p*dh,   v = j*sw - pw + q*dw,   p < kh, q < kw
    that lie inside [0, H) x [0, W) (padding is -inf: never selected).

* **forward** -- one thread per output element scans its window and keeps the
  running maximum and its tap number ``p*kw + q`` (``taps.py``: uint8 for any
  window up to 16x16, 8x less to write and read back than torch's int64 flat
  index, which ``max_pool2d_indices`` computes only for ``return_indices``).
  The update rule is torch's ``val > best or isnan(val)``: the first maximum
  wins on ties (a later equal value is not greater), and a NaN replaces
  anything, so NaN propagates (at the window's last NaN). The tap starts at the
  window's first in-bounds pixel, so a window of -inf reports that pixel, as
  torch. Consecutive threads take consecutive j, so their writes are
  coalesced; their reads are sw apart.
* **backward v1** -- a scatter that is race-free by ownership: one thread per
  (n, c) plane zeroes its plane of gx, then walks the plane's outputs in order
  and adds ``gy[i, j]`` at the input pixel of tap ``indices[i, j]``. Overlapping windows (stride <
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
  likewise columns -- and adds the gy of those whose selected tap is (h, v): the
  tap (p, q) with i*sh - ph + p*dh = h and j*sw - pw + q*dw = v, if any. Each
  gx element is written once, by one thread (coalesced, no zero fill), and
  the sum's order is fixed: deterministic. Both need the window's geometry,
  so the backward interface carries kernel_size, stride, padding and dilation
  (the reference and cpu backends, which scatter in order, do not need them).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from kernels import cuda_common as cc
from kernels.max_pool2d.taps import flat_indices, tap_dtype
from kernels.shapes import pool_output_size

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "max_pool2d_indices"]

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
    best_tap = p0 * kw + q0
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
                best_tap = p * kw + q
    y[n, c, i, j] = best
    idx[n, c, i, j] = best_tap


def max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode):
    """(y, indices): y (N, C, Ho, Wo) the window maxima, indices the tap numbers p*kw + q (``tap_dtype``)."""
    x = cc.as_input(x)
    n, c = x.shape[:2]
    ho, wo = (pool_output_size(x.shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a], ceil_mode) for a in (0, 1))
    y = cc.empty((n, c, ho, wo), x.dtype)
    idx = cc.empty((n, c, ho, wo), tap_dtype(kernel_size))
    _forward_kernel[cc.blocks(y.size, THREADS), THREADS](x, y, idx, *kernel_size, *stride, *padding, *dilation)
    return y, idx


@cuda.jit(device=True)
def _tap_position(tap, i, j, kw, sh, sw, ph, pw, dh, dw):
    """(h, v): the input pixel of tap number ``tap`` of window (i, j)."""
    p = int(tap) // kw  # int(): a signed integer (tap is unsigned; the simulator keeps NumPy's uint8 arithmetic)
    q = int(tap) - p * kw
    return i * sh - ph + p * dh, j * sw - pw + q * dw


@cuda.jit
def _backward_kernel(gy, idx, gx, kw, sh, sw, ph, pw, dh, dw):
    """v1: thread e owns plane e = (n, c) of gx: zero it, then add each gy of the plane at its selected tap."""
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
            h, v = _tap_position(idx[n, c, i, j], i, j, kw, sh, sw, ph, pw, dh, dw)
            gx[n, c, h, v] += gy[n, c, i, j]


@cuda.jit
def _zero_kernel(flat):
    """Thread e: flat[e] = 0 (consecutive threads, consecutive addresses)."""
    e = cuda.grid(1)
    if e < flat.size:
        flat[e] = 0


@cuda.jit
def _scatter_kernel(gy, idx, gx, kw, sh, sw, ph, pw, dh, dw):
    """v2, windows that do not overlap: thread e stores gy.flat[e] at its selected tap (owned by it alone)."""
    e = cuda.grid(1)
    if e >= gy.size:
        return
    _, c_n, ho, wo = gy.shape
    n, c, i, j = cc.unravel4(e, c_n, ho, wo)
    h, v = _tap_position(idx[n, c, i, j], i, j, kw, sh, sw, ph, pw, dh, dw)
    gx[n, c, h, v] = gy[n, c, i, j]


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
    acc = gx.dtype.type(0)
    for i in range(i0, i1 + 1):
        dp = h - (i * sh - ph)  # pixel h is tap p = dp / dh of window row i, if dh divides dp
        if dp % dh != 0:
            continue
        for j in range(j0, j1 + 1):
            dq = v - (j * sw - pw)
            if dq % dw == 0 and idx[n, c, i, j] == (dp // dh) * kw + dq // dw:
                acc += gy[n, c, i, j]
    gx[n, c, h, v] = acc


def _backward_v1(gy, indices, gx, kernel_size, stride, padding, dilation):
    _backward_kernel[cc.blocks(gx.shape[0] * gx.shape[1], THREADS), THREADS](gy, indices, gx, kernel_size[1], *stride, *padding, *dilation)


def _backward_v2(gy, indices, gx, kernel_size, stride, padding, dilation):
    spans = [dilation[a] * (kernel_size[a] - 1) + 1 for a in (0, 1)]
    if stride[0] >= spans[0] and stride[1] >= spans[1]:  # no two windows share a pixel
        _zero_kernel[cc.blocks(gx.size, THREADS), THREADS](gx.reshape(-1))
        _scatter_kernel[cc.blocks(gy.size, THREADS), THREADS](gy, indices, gx, kernel_size[1], *stride, *padding, *dilation)
    else:
        _gather_kernel[cc.blocks(gx.size, THREADS), THREADS](gy, indices, gx, *kernel_size, *stride, *padding, *dilation)


BACKWARD_VERSIONS = {1: _backward_v1, 2: _backward_v2}
DEFAULT_BACKWARD_VERSION = 2  # statically better: N*C*H*W coalesced threads instead of N*C (no GPU timing yet)


def max_pool2d_backward(gy, indices, x_shape, kernel_size, stride, padding, dilation, version=DEFAULT_BACKWARD_VERSION):
    """gx (x_shape): gy[n, c, i, j] added at the input pixel of tap indices[n, c, i, j]; ``version`` of BACKWARD_VERSIONS."""
    gy = cc.as_input(gy)
    indices = cc.as_input(indices, tap_dtype(kernel_size))
    gx = cc.empty(tuple(x_shape), gy.dtype)
    BACKWARD_VERSIONS[version](gy, indices, gx, kernel_size, stride, padding, dilation)
    return gx


def max_pool2d_indices(indices, x_shape, kernel_size, stride, padding, dilation):
    """torch's flat int64 indices r*W + c into the input plane, from the forward's tap numbers (array ops on the device)."""
    return flat_indices(cc.as_input(indices), x_shape, kernel_size, stride, padding, dilation, cc.xp)


def _signatures(template):
    """PTX signatures for float32 and float64; {A} a C-contiguous (N, C, H, W) float array, {I} the same of
    uint8 tap numbers (the type of every window up to 16x16; larger windows compile for uint16/uint32 when used)."""
    return cc.float_signatures(template, A="{t}[:, :, :, ::1]", I="uint8[:, :, :, ::1]")


_WINDOW = ", ".join(["int64"] * 7)  # kw and the stride, padding and dilation pairs
PTX_SIGNATURES = [
    (_forward_kernel, _signatures("void({A}, {A}, {I}, " + ", ".join(["int64"] * 8) + ")")),  # 4 (h, w) pairs
    (_backward_kernel, _signatures("void({A}, {I}, {A}, " + _WINDOW + ")")),
    (_zero_kernel, _signatures("void({t}[::1])")),
    (_scatter_kernel, _signatures("void({A}, {I}, {A}, " + _WINDOW + ")")),
    (_gather_kernel, _signatures("void({A}, {I}, {A}, " + ", ".join(["int64"] * 8) + ")")),
]
