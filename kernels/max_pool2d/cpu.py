"""max_pool2d on the CPU: torch's window scan in Numba, one (n, c) plane per task.

The math is in ``reference.py``. The forward walks each window in scan order
(rows, then columns) and keeps a tap when ``x > best or x is NaN`` -- exactly the
rule that makes the first maximum win and the last NaN win. Padding is never
materialised: the in-image part of every window is computed once per output row
and column (``_window_bounds``), so the scan has no bounds checks.

The backward scatters ``gy`` to the recorded indices. A scatter is race-free
here because indices never leave their plane and each plane belongs to one
task; the plane is zeroed by the task that fills it. Every output is fresh.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.shapes import pool_output_size

__all__ = ["max_pool2d_forward", "max_pool2d_backward"]


def _window_bounds(size, n_out, k, s, p, d):
    """First in-image tap of each window (on the dilation grid) and the end of its taps, clipped to the input."""
    start = np.arange(n_out) * s - p
    first = np.where(start < 0, start + -(start // d) * d, start)  # step start up the grid until >= 0
    end = np.minimum(start + (k - 1) * d + 1, size)
    return first.astype(np.int64), end.astype(np.int64)


@njit(parallel=True, cache=True)
def _forward_kernel(x, r0, r1, c0, c1, dh, dw, y, idx):
    planes, _, w = x.shape
    ho, wo = y.shape[1], y.shape[2]
    for p in prange(planes):
        for i in range(ho):
            for j in range(wo):
                best = -np.inf
                arg = r0[i] * w + c0[j]
                for r in range(r0[i], r1[i], dh):
                    for q in range(c0[j], c1[j], dw):
                        v = x[p, r, q]
                        if v > best or v != v:  # v != v: NaN
                            best = v
                            arg = r * w + q
                y[p, i, j] = best
                idx[p, i, j] = arg


@njit(parallel=True, cache=True)
def _backward_kernel(gy, idx, gx):
    planes, ho, wo = gy.shape
    for p in prange(planes):
        gx[p, :] = 0
        for i in range(ho):
            for j in range(wo):
                gx[p, idx[p, i, j]] += gy[p, i, j]


def max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode):
    n, c, h, w = x.shape
    out = [pool_output_size(x.shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a], ceil_mode) for a in range(2)]
    r0, r1 = _window_bounds(h, out[0], kernel_size[0], stride[0], padding[0], dilation[0])
    c0, c1 = _window_bounds(w, out[1], kernel_size[1], stride[1], padding[1], dilation[1])
    y = np.empty((n, c, *out), x.dtype)
    idx = np.empty((n, c, *out), np.int64)
    per_plane = (n * c, *out)
    _forward_kernel(x.reshape(n * c, h, w), r0, r1, c0, c1, *dilation, y.reshape(per_plane), idx.reshape(per_plane))
    return y, idx


def max_pool2d_backward(gy, indices, x_shape, kernel_size, stride, padding, dilation):
    """gx[n, c].flat[indices] += gy: one job per plane adds in order (race-free; the window is not needed)."""
    n, c, h, w = x_shape
    gx = np.empty(x_shape, gy.dtype)
    ho, wo = gy.shape[2:]
    _backward_kernel(gy.reshape(n * c, ho, wo), indices.reshape(n * c, ho, wo), gx.reshape(n * c, h * w))
    return gx
