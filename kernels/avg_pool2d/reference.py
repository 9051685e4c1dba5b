"""avg_pool2d and adaptive_avg_pool2d, the definition: window means, as two small matrix products.

Forward
-------
Each output pixel is the sum of an input rectangle divided by a divisor::

    y[n, c, i, j] = (1 / (div_r[i] * div_c[j])) * sum over r0[i] <= r < r1[i], c0[j] <= s < c1[j] of x[n, c, r, s]

``windows.py`` gives the per-axis tables (start, end, divisor) for both ops:
avg_pool2d's ``i*stride - padding`` windows with torch's ``ceil_mode``,
``count_include_pad`` and ``divisor_override`` rules, and adaptive_avg_pool2d's
``[floor(i*H/Ho), ceil((i+1)*H/Ho))``. Because a window is a row range times a
column range, the sum factorises. With the 0/1 *membership matrices*
``A_r[i, r] = [r0[i] <= r < r1[i]]`` (Ho, H) and ``A_c[j, s]`` (Wo, W)::

    y[n, c] = (A_r @ x[n, c] @ A_c.T) / D,        D[i, j] = div_r[i] * div_c[j]

Backward
--------
y is linear in x, with ``dy[i, j] / dx[r, s] = A_r[i, r] * A_c[j, s] / D[i, j]``.
The chain rule sums over the outputs::

    gx[r, s] = sum_ij gy[i, j] * A_r[i, r] * A_c[j, s] / D[i, j]
    gx[n, c] = A_r.T @ (gy[n, c] / D) @ A_c

i.e. each input pixel collects ``gy / D`` of every window that holds it (zero if
none does: a stride larger than the kernel skips pixels). Padding never receives
gradient: it is not an input.

Memory: the matrices are Ho*H and Wo*W, and the one intermediate is
(N, C, Ho, W), no larger than the input for pooling -- this reference also runs
at benchmark sizes, so it avoids the (N, C, Ho, Wo, kh, kw) window tensor a
direct transcription would build.
"""
from __future__ import annotations

import numpy as np

from kernels.avg_pool2d.windows import adaptive_avg_pool2d_windows, avg_pool2d_windows

__all__ = ["avg_pool2d_forward", "avg_pool2d_backward", "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward"]


def _membership(start, end, size, dtype):
    """A[i, r] = 1 if start[i] <= r < end[i], else 0: (n_out, size)."""
    r = np.arange(size)
    return ((r >= start[:, None]) & (r < end[:, None])).astype(dtype)


def _mean_forward(x, rows, cols):
    a_r = _membership(rows[0], rows[1], x.shape[2], x.dtype)
    a_c = _membership(cols[0], cols[1], x.shape[3], x.dtype)
    divisor = (rows[2][:, None] * cols[2][None, :]).astype(x.dtype)
    return (a_r @ x @ a_c.T) / divisor


def _mean_backward(gy, x_shape, rows, cols):
    a_r = _membership(rows[0], rows[1], x_shape[2], gy.dtype)
    a_c = _membership(cols[0], cols[1], x_shape[3], gy.dtype)
    divisor = (rows[2][:, None] * cols[2][None, :]).astype(gy.dtype)
    return a_r.T @ (gy / divisor) @ a_c


def avg_pool2d_forward(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """y (N, C, Ho, Wo): window sums over the divisor; Ho, Wo = kernels.shapes.pool_output_size (dilation 1)."""
    return _mean_forward(x, *avg_pool2d_windows(x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override))


def avg_pool2d_backward(gy, x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """gx (x_shape): every input pixel collects gy / divisor of each window that holds it."""
    windows = avg_pool2d_windows(x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return _mean_backward(gy, x_shape, *windows)


def adaptive_avg_pool2d_forward(x, output_size):
    """y (N, C, Ho, Wo) with (Ho, Wo) = output_size: the mean of rows [floor(i*H/Ho), ceil((i+1)*H/Ho)) x the same for columns."""
    return _mean_forward(x, *adaptive_avg_pool2d_windows(x.shape, output_size))


def adaptive_avg_pool2d_backward(gy, x_shape):
    """gx (x_shape); the output size is gy's."""
    return _mean_backward(gy, x_shape, *adaptive_avg_pool2d_windows(x_shape, gy.shape[2:]))
