"""The windows of avg_pool2d and adaptive_avg_pool2d: what every backend averages over.

Both ops are *separable*: output ``(i, j)`` of a plane sums the input rectangle
``rows [r0[i], r1[i]) x cols [c0[j], c1[j])`` and divides the sum by
``div_r[i] * div_c[j]``. The two ops differ only in these per-axis tables, so the
three backends share them and each has one averaging kernel for both ops.

avg_pool2d (torch's rule), along an axis of ``size`` with kernel ``k``, stride
``s`` and padding ``p`` (n_out from ``kernels.shapes.pool_output_size``)::

    start = i*s - p,   end = min(start + k, size + p)     (ceil_mode's last window may
                                                           overhang the padding: cut there)
    divisor = end - start            if count_include_pad  (padding counts as zeros)
            = min(end, size) - max(start, 0)   otherwise   (only the input pixels)
    window  = [max(start, 0), min(end, size))

``divisor_override`` D replaces the divisor by D: rows get 1, columns D.

adaptive_avg_pool2d (torch's rule), ``n_out`` outputs from ``size`` inputs::

    start = floor(i * size / n_out),   end = ceil((i + 1) * size / n_out),   divisor = end - start

Windows overlap when ``size`` is not a multiple of ``n_out`` and repeat inputs
when ``n_out > size``. Every window is non-empty: ``functional.py`` keeps
``p <= k/2`` and ``pool_output_size`` drops a ceil_mode window that would start
in the right padding.
"""
from __future__ import annotations

import numpy as np

from kernels.shapes import pool_output_size


def pool_windows(size, kernel, stride, padding, ceil_mode, count_include_pad):
    """(start, end, divisor) int64 arrays of one avg_pool2d axis (see the module docstring)."""
    n_out = pool_output_size(size, kernel, stride, padding, 1, ceil_mode)
    start = np.arange(n_out, dtype=np.int64) * stride - padding
    end = np.minimum(start + kernel, size + padding)
    padded_count = end - start
    start, end = np.maximum(start, 0), np.minimum(end, size)
    return start, end, padded_count if count_include_pad else end - start


def adaptive_windows(size, n_out):
    """(start, end, divisor) int64 arrays of one adaptive_avg_pool2d axis: floor(i*in/out), ceil((i+1)*in/out)."""
    i = np.arange(n_out, dtype=np.int64)
    start = i * size // n_out
    end = -(-(i + 1) * size // n_out)
    return start, end, end - start


def avg_pool2d_windows(x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """(rows, cols): the (start, end, divisor) tables of both axes of avg_pool2d."""
    rows, cols = (
        pool_windows(x_shape[2 + a], kernel_size[a], stride[a], padding[a], ceil_mode, count_include_pad) for a in (0, 1)
    )
    if divisor_override is not None:  # div_r[i] * div_c[j] == D for every output
        rows = (rows[0], rows[1], np.ones_like(rows[2]))
        cols = (cols[0], cols[1], np.full_like(cols[2], divisor_override))
    return rows, cols


def adaptive_avg_pool2d_windows(x_shape, output_size):
    """(rows, cols): the (start, end, divisor) tables of both axes of adaptive_avg_pool2d."""
    return tuple(adaptive_windows(x_shape[2 + a], output_size[a]) for a in (0, 1))


def outputs_reading(start, end, size):
    """(lo, hi): input index r lies in the windows of outputs lo[r] <= i < hi[r].

    Starts and ends never decrease with i, so those outputs are contiguous:
    ``end[i] > r`` from the first i with end > r on, ``start[i] <= r`` up to the
    last i with start <= r. A backward that *gathers* (one input pixel adds up
    the outputs that read it) loops over this range, with no atomics.
    """
    r = np.arange(size)
    return np.searchsorted(end, r, side="right").astype(np.int64), np.searchsorted(start, r, side="right").astype(np.int64)
