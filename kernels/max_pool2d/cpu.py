"""max_pool2d on the CPU: torch's window scan in Numba, parallel over (n, c) planes.

The math is in ``reference.py``; what is stored for the backward (the selected
tap's number p*kw + q, in uint8 for any window up to 16x16) in ``taps.py``.

* **forward, any window** -- each window is scanned in torch's order (rows,
  then columns), keeping a tap when ``x > best or x is NaN``: exactly the rule
  that makes the first maximum win and the last NaN win. Padding is never
  materialised: the in-image taps of every window are computed once per output
  row and column (``_tap_ranges``), so the scan has no bounds checks.
* **forward, 2x2 stride 2** (the U-Net's pool: no padding, no dilation, every
  window inside the image) -- one loop per output row over the two input rows
  it reads, the four taps compared with selects instead of branches: no
  data-dependent branch, so LLVM vectorises it across the row's windows
  (``_pool_2x2_row``).
* **backward, any window** -- ``gy`` scattered to the selected taps. A scatter
  is race-free here because a window's taps never leave its plane and each
  plane belongs to one task, which first zeroes it. The input position of a
  tap is the window's origin plus the tap's offset (``taps.py``): a table
  lookup, no division.
* **backward, 2x2 stride 2** -- the windows tile the image, so every input
  pixel belongs to exactly one window: each window writes its four gx pixels
  (gy at the selected tap, 0 at the other three). One pass of plain stores,
  no zero fill first, vectorised like the forward (``_unpool_2x2_row``).

Every output is fresh.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.max_pool2d.taps import flat_indices, tap_dtype, tap_offsets, window_origins
from kernels.shapes import pool_output_size

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "max_pool2d_indices"]

_ROW_OPTIONS = dict(cache=True, error_model="numpy")  # no division check: it would block vectorisation


def _tap_ranges(size, n_out, k, s, p, d):
    """Per output along one axis: (start, first, end) -- the input coordinate of tap 0 (maybe in the
    padding), and the range [first, end) of the taps that land inside [0, size)."""
    start = np.arange(n_out) * s - p
    first = np.maximum(-(start // d), 0)  # ceil(-start / d) taps lie in the leading padding
    end = np.minimum(-((start - size) // d), k)  # taps t with start + t*d < size
    return start.astype(np.int64), first.astype(np.int64), end.astype(np.int64)


def _is_2x2(x_shape, out, kernel_size, stride, padding, dilation):
    """2x2 windows at stride 2 with no padding or dilation, all inside the image (no ceil_mode remainder)."""
    return (
        kernel_size == (2, 2) and stride == (2, 2) and padding == (0, 0) and dilation == (1, 1)
        and 2 * out[0] <= x_shape[2] and 2 * out[1] <= x_shape[3]
    )


@njit(parallel=True, cache=True)
def _forward_kernel(x, r_start, p_first, p_end, c_start, q_first, q_end, kw, dh, dw, y, idx):
    planes = x.shape[0]
    ho, wo = y.shape[1], y.shape[2]
    for plane in prange(planes):
        for i in range(ho):
            for j in range(wo):
                best = -np.inf
                arg = p_first[i] * kw + q_first[j]  # a window of -inf reports its first in-image tap (torch)
                for p in range(p_first[i], p_end[i]):
                    r = r_start[i] + p * dh
                    for q in range(q_first[j], q_end[j]):
                        v = x[plane, r, c_start[j] + q * dw]
                        if v > best or v != v:  # v != v: NaN
                            best = v
                            arg = p * kw + q
                y[plane, i, j] = best
                idx[plane, i, j] = arg


@njit(**_ROW_OPTIONS)
def _pool_2x2_row(top, bottom, y, idx):
    """y[j] = max of top[2j], top[2j+1], bottom[2j], bottom[2j+1] (torch's scan order and rule), idx[j] its tap 0..3."""
    for j in range(y.size):
        best = top[2 * j]  # tap 0 is always taken: v > -inf, or v is NaN, or v = -inf = best
        arg = 0
        for tap, v in ((1, top[2 * j + 1]), (2, bottom[2 * j]), (3, bottom[2 * j + 1])):
            take = v > best or v != v
            best = v if take else best
            arg = tap if take else arg
        y[j] = best
        idx[j] = arg


@njit(parallel=True, cache=True)
def _forward_2x2_kernel(x, y, idx):
    planes, ho = y.shape[0], y.shape[1]
    for row in prange(planes * ho):
        plane, i = row // ho, row % ho
        _pool_2x2_row(x[plane, 2 * i], x[plane, 2 * i + 1], y[plane, i], idx[plane, i])


@njit(parallel=True, cache=True)
def _backward_kernel(gy, idx, origins, offsets, gx):
    planes, ho, wo = gy.shape
    for plane in prange(planes):
        gx[plane, :] = 0
        for i in range(ho):
            for j in range(wo):
                gx[plane, origins[i, j] + offsets[idx[plane, i, j]]] += gy[plane, i, j]


@njit(**_ROW_OPTIONS)
def _unpool_2x2_row(gy, idx, top, bottom):
    """The four gx pixels of each window j of a row: gy[j] at its selected tap, 0 at the others."""
    zero = top.dtype.type(0)
    for j in range(gy.size):
        g, t = gy[j], idx[j]
        top[2 * j] = g if t == 0 else zero
        top[2 * j + 1] = g if t == 1 else zero
        bottom[2 * j] = g if t == 2 else zero
        bottom[2 * j + 1] = g if t == 3 else zero


@njit(parallel=True, cache=True)
def _backward_2x2_kernel(gy, idx, gx):
    planes, ho, wo = gy.shape
    for plane in prange(planes):
        for i in range(ho):
            _unpool_2x2_row(gy[plane, i], idx[plane, i], gx[plane, 2 * i], gx[plane, 2 * i + 1])
        gx[plane, : 2 * ho, 2 * wo :] = 0  # an odd last column or row belongs to no window
        gx[plane, 2 * ho :, :] = 0


def max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode):
    """(y, indices) as the reference: y (N, C, Ho, Wo), indices the selected taps p*kw + q (``tap_dtype``)."""
    n, c, h, w = x.shape
    out = tuple(pool_output_size(x.shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a], ceil_mode) for a in range(2))
    y = np.empty((n, c, *out), x.dtype)
    idx = np.empty((n, c, *out), tap_dtype(kernel_size))
    planes, per_plane = x.reshape(n * c, h, w), (n * c, *out)
    if _is_2x2(x.shape, out, kernel_size, stride, padding, dilation):
        _forward_2x2_kernel(planes, y.reshape(per_plane), idx.reshape(per_plane))
        return y, idx
    rows = _tap_ranges(h, out[0], kernel_size[0], stride[0], padding[0], dilation[0])
    cols = _tap_ranges(w, out[1], kernel_size[1], stride[1], padding[1], dilation[1])
    _forward_kernel(planes, *rows, *cols, kernel_size[1], *dilation, y.reshape(per_plane), idx.reshape(per_plane))
    return y, idx


def max_pool2d_backward(gy, indices, x_shape, kernel_size, stride, padding, dilation):
    """gx: gy added at each window's selected tap; one job per plane (race-free)."""
    n, c, h, w = x_shape
    gx = np.empty(x_shape, gy.dtype)
    ho, wo = gy.shape[2:]
    per_plane = (n * c, ho, wo)
    if _is_2x2(x_shape, (ho, wo), kernel_size, stride, padding, dilation):
        _backward_2x2_kernel(gy.reshape(per_plane), indices.reshape(per_plane), gx.reshape(n * c, h, w))
        return gx
    origins = window_origins((ho, wo), w, stride, padding)
    offsets = tap_offsets(w, kernel_size, dilation)
    _backward_kernel(gy.reshape(per_plane), indices.reshape(per_plane), origins, offsets, gx.reshape(n * c, h * w))
    return gx


def max_pool2d_indices(indices, x_shape, kernel_size, stride, padding, dilation):
    """torch's flat int64 indices r*W + c into the input plane, from the forward's tap numbers."""
    return flat_indices(indices, x_shape, kernel_size, stride, padding, dilation)
