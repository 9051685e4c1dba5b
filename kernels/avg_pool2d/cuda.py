"""avg_pool2d and adaptive_avg_pool2d on the GPU: one thread per output (forward), one per input (backward).

Read ``reference.py`` first. As on the CPU, both ops share two kernels that see
only the per-axis window tables of ``windows.py`` (computed on the host, a few
hundred bytes, copied once per call):

* **forward** -- thread e owns ``y.flat[e]``: it sums the rectangle
  ``[r0[i], r1[i]) x [c0[j], c1[j])`` of its plane and divides by
  ``div_r[i] * div_c[j]``. Consecutive threads take consecutive j, so their writes
  are coalesced and their reads overlap (neighbouring windows share columns).
* **backward** -- a gather, thread e owns ``gx.flat[e]``: it adds
  ``gy / divisor`` over the outputs whose windows hold its pixel, the contiguous
  ranges ``windows.outputs_reading`` gives per axis. No two threads write one
  address, so no atomics and no zeroing pass; every pixel is written (with 0 when
  no window holds it), which the poisoned outputs of the tests check.

The accumulator has the input's float type (float64 arithmetic is slow on most
GPUs); the divisor tables are passed in that type for the same reason.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from kernels import cuda_common as cc
from kernels.avg_pool2d.windows import adaptive_avg_pool2d_windows, avg_pool2d_windows, outputs_reading

__all__ = ["avg_pool2d_forward", "avg_pool2d_backward", "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward"]

THREADS = 128


@cuda.jit
def _forward_kernel(x, r0, r1, c0, c1, div_r, div_c, y):
    """Thread e computes y.flat[e], j fastest."""
    e = cuda.grid(1)
    if e >= y.size:
        return
    _, c_n, ho, wo = y.shape
    n, c, i, j = cc.unravel4(e, c_n, ho, wo)
    acc = x.dtype.type(0)
    for r in range(r0[i], r1[i]):
        for s in range(c0[j], c1[j]):
            acc += x[n, c, r, s]
    y[n, c, i, j] = acc / (div_r[i] * div_c[j])


@cuda.jit
def _backward_kernel(gy, lo_r, hi_r, lo_c, hi_c, div_r, div_c, gx):
    """Thread e computes gx.flat[e]: the sum of gy / divisor over the windows holding its pixel."""
    e = cuda.grid(1)
    if e >= gx.size:
        return
    _, c_n, h, w = gx.shape
    n, c, r, s = cc.unravel4(e, c_n, h, w)
    acc = gx.dtype.type(0)
    for i in range(lo_r[r], hi_r[r]):
        for j in range(lo_c[s], hi_c[s]):
            acc += gy[n, c, i, j] / (div_r[i] * div_c[j])
    gx[n, c, r, s] = acc


def _tables(axes, dtype):
    """Device copies of (start-like, end-like) int64 arrays per axis, then the divisors in ``dtype``."""
    ints = [cc.as_input(a, np.int64) for axis in axes for a in axis[:2]]
    return (*ints, *(cc.as_input(axis[2], dtype) for axis in axes))


def _mean_forward(x, rows, cols):
    x = cc.as_input(x)
    n, c = x.shape[:2]
    y = cc.empty((n, c, len(rows[0]), len(cols[0])), x.dtype)
    _forward_kernel[cc.blocks(y.size, THREADS), THREADS](x, *_tables((rows, cols), x.dtype), y)
    return y


def _mean_backward(gy, x_shape, rows, cols):
    gy = cc.as_input(gy)
    gx = cc.empty(tuple(x_shape), gy.dtype)
    ranges = [(*outputs_reading(axis[0], axis[1], x_shape[2 + a]), axis[2]) for a, axis in enumerate((rows, cols))]
    _backward_kernel[cc.blocks(gx.size, THREADS), THREADS](gy, *_tables(ranges, gy.dtype), gx)
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


def _signatures(template):
    """PTX signatures for float32 and float64: {A} a C-contiguous (N, C, H, W) float array, {I} an int64 table, {D} a float one."""
    return cc.float_signatures(template, A="{t}[:, :, :, ::1]", I="int64[::1]", D="{t}[::1]")


PTX_SIGNATURES = [
    (_forward_kernel, _signatures("void({A}, {I}, {I}, {I}, {I}, {D}, {D}, {A})")),
    (_backward_kernel, _signatures("void({A}, {I}, {I}, {I}, {I}, {D}, {D}, {A})")),
]
