"""avg_pool2d and adaptive_avg_pool2d on the CPU: one averaging kernel pair for both, one (n, c) plane per task.

The math is in ``reference.py``; the per-axis window tables come from
``windows.py``, so the kernels never see kernel_size, stride, padding or the
adaptive rule -- only ``[r0[i], r1[i]) x [c0[j], c1[j])`` and the divisors.

* forward: each output sums its rectangle (a float64 accumulator: free on a CPU,
  and it keeps float32 sums of large windows accurate) and divides.
* backward: a *gather*, each input pixel adds ``gy / divisor`` over the outputs
  whose windows hold it (``windows.outputs_reading``: a contiguous range per
  axis). Every gx element is written once by one task: no races, no zeroing pass,
  and a fixed summation order.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.avg_pool2d.windows import adaptive_avg_pool2d_windows, avg_pool2d_windows, outputs_reading

__all__ = ["avg_pool2d_forward", "avg_pool2d_backward", "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward"]


@njit(parallel=True, cache=True)
def _forward_kernel(x, r0, r1, c0, c1, div_r, div_c, y):
    planes, ho, wo = y.shape
    for p in prange(planes):
        for i in range(ho):
            for j in range(wo):
                acc = 0.0
                for r in range(r0[i], r1[i]):
                    for s in range(c0[j], c1[j]):
                        acc += x[p, r, s]
                y[p, i, j] = acc / (div_r[i] * div_c[j])


@njit(parallel=True, cache=True)
def _backward_kernel(gy, lo_r, hi_r, lo_c, hi_c, div_r, div_c, gx):
    planes, h, w = gx.shape
    for p in prange(planes):
        for r in range(h):
            for s in range(w):
                acc = 0.0
                for i in range(lo_r[r], hi_r[r]):
                    for j in range(lo_c[s], hi_c[s]):
                        acc += gy[p, i, j] / (div_r[i] * div_c[j])
                gx[p, r, s] = acc


def _mean_forward(x, rows, cols):
    n, c, h, w = x.shape
    y = np.empty((n, c, len(rows[0]), len(cols[0])), x.dtype)
    _forward_kernel(x.reshape(n * c, h, w), *rows[:2], *cols[:2], rows[2], cols[2], y.reshape(n * c, *y.shape[2:]))
    return y


def _mean_backward(gy, x_shape, rows, cols):
    n, c, h, w = x_shape
    gx = np.empty(x_shape, gy.dtype)
    ranges = (*outputs_reading(rows[0], rows[1], h), *outputs_reading(cols[0], cols[1], w))
    _backward_kernel(gy.reshape(n * c, *gy.shape[2:]), *ranges, rows[2], cols[2], gx.reshape(n * c, h, w))
    return gx


def avg_pool2d_forward(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _mean_forward(x, *avg_pool2d_windows(x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override))


def avg_pool2d_backward(gy, x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    windows = avg_pool2d_windows(x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return _mean_backward(gy, x_shape, *windows)


def adaptive_avg_pool2d_forward(x, output_size):
    return _mean_forward(x, *adaptive_avg_pool2d_windows(x.shape, output_size))


def adaptive_avg_pool2d_backward(gy, x_shape):
    return _mean_backward(gy, x_shape, *adaptive_avg_pool2d_windows(x_shape, gy.shape[2:]))
