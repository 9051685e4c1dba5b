"""Batch normalisation (and batch norm fused with the ReLU after it) on the CPU (Numba).

Read ``reference.py`` first for the math and the backward derivation. The
input is seen as (N, C, L) planes, L = H * W, each plane contiguous. Every
pass is parallel over the N * C planes and runs contiguous loops inside each
plane. A batch-norm layer is memory-bound (a few flops per value read), so the
aim is to read and write every array as few times as possible, with inner loops
fast enough that memory, not the arithmetic, sets the time:

* statistics: **one read of x**. Each plane is cut into chunks of CHUNK values
  (8 KiB of float32, so a chunk stays in the L1 cache); a chunk's mean and its
  sum of squared deviations M2 are computed by two loops over the chunk (the
  second reads L1, not memory), and the chunks are merged with Chan's formula
  (``_chan_merge``). The planes of a channel, all of L values, are merged
  afterwards in NumPy: mean = the mean of the plane means, M2 = sum M2_p +
  L sum_p (mean_p - mean)^2. Everything is float64 and only squared *deviations*
  are ever added (never sum x^2 - M mean^2, which cancels when |mean| >> std), so
  it is as accurate as the reference's two passes over all of x, with half the
  reads. (Version 1 made exactly those two passes.)
* the float64 sums are **vectorised**: a plain ``acc += v`` loop is one chain of
  dependent additions, each waiting for the last (the adder's latency per value,
  several times slower than the memory). The reduction helpers carry
  ``fastmath={"reassoc"}``, which lets LLVM keep several vector accumulators and
  add them at the end; nothing else about IEEE arithmetic is relaxed (no
  contraction, NaN and inf kept), and the order is fixed by the compiled loop, so
  a run is deterministic.
* forward: one pass reading x and writing xhat = (x - mean) invstd and y =
  w xhat + b, or max(w xhat + b, 0) with the fused ReLU (``relu=True``).
* backward: one reduction pass for sum(g) and sum(g xhat) per plane (gbias and
  gweight, which give the two means of the training-mode formula), then one
  elementwise pass for gx. With the fused ReLU g = gy where y > 0, else 0, read in
  both passes from the saved output y: the masked gradient is never written.

Why the forward still writes xhat: the backward could recompute it from x, mean
and invstd, saving one write per value in the forward. But x would then have to
stay alive instead of xhat (the same memory), every backend and the synchronised
batch norm share the (y, xhat, invstd) interface, and the backward's traffic is
the same either way (it reads one of x or xhat twice). The write was kept; it is
the one pass this design leaves on the table.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

__all__ = ["batch_norm_stats", "batch_norm_forward", "batch_norm_backward"]

CHUNK = 1024  # values per statistics chunk (4 KiB of float32): partial sums in the input's dtype
SAMPLE = 16  # the first values of a plane, whose mean centres its first chunk


def _planes(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


@njit(cache=True)
def _difference(a, k, centre):
    """a[k] - centre, outside the ``reassoc`` helpers: no compiler may fold the shift into the sums."""
    return a[k] - centre


@njit(fastmath={"reassoc"}, cache=True)
def _shifted_sums(a, start, stop, centre):
    """(sum d, sum d^2) as float64, d = a[start:stop] - centre, accumulated in a's dtype (vectorised)."""
    acc, acc_sq = a.dtype.type(0), a.dtype.type(0)
    for k in range(start, stop):
        d = _difference(a, k, centre)
        acc += d
        acc_sq += d * d
    return np.float64(acc), np.float64(acc_sq)


@njit(cache=True)
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(mean, M2) of the union of two sets of n_a and n_b values from each set's (mean, M2).

    Chan et al. (1979), with d = mean_b - mean_a and n = n_a + n_b:
    mean = mean_a + d n_b / n, M2 = M2_a + M2_b + d^2 n_a n_b / n (no cancelling terms).
    """
    n = n_a + n_b
    d = mean_b - mean_a
    return mean_a + d * (n_b / n), m2_a + m2_b + d * d * (n_a * (n_b / n))


@njit(cache=True)
def _plane_mean_m2(plane, chunk):
    """(mean, M2) of one plane in float64, one read: per chunk shifted sums, chunks Chan-merged."""
    length = plane.shape[0]
    centre = np.float64(0)
    for k in range(min(SAMPLE, length)):
        centre += plane[k]
    centre /= min(SAMPLE, length)
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        size = stop - start
        # d = x - c for a centre c near the mean (the plane's first values, then the mean so far):
        # M2 = sum d^2 - (sum d)^2 / size holds for any c, and the correction is small when c is
        # within a standard deviation of the chunk's mean. Further away, more than half of
        # sum d^2 would cancel (the |mean| >> std trap): recentre on the chunk's mean, computed
        # just now, and sum again (the chunk is still in L1).
        c = plane.dtype.type(centre if count == 0 else mean)
        shift, square = _shifted_sums(plane, start, stop, c)
        if shift * shift / size > 0.5 * square:
            c = plane.dtype.type(c + shift / size)
            shift, square = _shifted_sums(plane, start, stop, c)
        mean, m2 = _chan_merge(count, mean, m2, size, c + shift / size, square - shift * shift / size)
        count += size
    return mean, m2


@njit(parallel=True, cache=True)
def _stats_kernel(x, chunk, mean, var):
    """mean[c], var[c] (biased) of x (N, C, L): planes in parallel, then each channel's N planes merged."""
    n, c, length = x.shape
    planes = np.empty((n, c, 2))
    for p in prange(n * c):
        i, ch = p // c, p % c
        planes[i, ch, 0], planes[i, ch, 1] = _plane_mean_m2(x[i, ch], chunk)
    for ch in range(c):
        # N planes of L values each: mean = the mean of the plane means,
        # M2 = sum_p M2_p + L sum_p (mean_p - mean)^2 (Chan's merge for equal counts); fixed order
        m = 0.0
        for i in range(n):
            m += planes[i, ch, 0]
        m /= n
        m2 = 0.0
        for i in range(n):
            d = planes[i, ch, 0] - m
            m2 += planes[i, ch, 1] + length * d * d
        mean[ch] = m
        var[ch] = m2 / (n * length)


@njit(parallel=True, cache=True)
def _forward_kernel(x, mean, var, weight, bias, eps, relu, y, xhat, invstd):
    """invstd = 1/sqrt(var + eps) (float64, then x's dtype); xhat = (x - mean) invstd,
    y = w xhat + b (then max(y, 0) if relu), per plane. Numba compiles the None cases of
    weight and bias without their branch."""
    n, c, length = x.shape
    one, zero = x.dtype.type(1), x.dtype.type(0)
    for ch in range(c):
        invstd[ch] = 1.0 / np.sqrt(np.float64(var[ch]) + eps)
    for p in prange(n * c):
        i, ch = p // c, p % c
        m, s = mean[ch], invstd[ch]
        wc = one if weight is None else weight[ch]
        bc = zero if bias is None else bias[ch]
        for k in range(length):
            v = (x[i, ch, k] - m) * s
            xhat[i, ch, k] = v
            out = v * wc + bc
            # ``not out <= 0`` keeps a NaN, as torch's relu
            y[i, ch, k] = out if not (relu and out <= 0) else zero


@njit(cache=True)
def _gradient(gy, relu_output, i, ch, k):
    """gy at (i, ch, k), or 0 where the fused ReLU's output is not > 0 (Numba drops the test when relu_output is None)."""
    if relu_output is None:
        return gy[i, ch, k]
    return gy[i, ch, k] if relu_output[i, ch, k] > 0 else gy.dtype.type(0)


@njit(fastmath={"reassoc"}, cache=True)
def _plane_gradient_sums(gy, xhat, relu_output, i, ch):
    """(sum g, sum g xhat) over plane (i, ch) in float64 (vectorised), g = gy masked by the fused ReLU."""
    total, total_x = 0.0, 0.0
    for k in range(gy.shape[2]):
        g = np.float64(_gradient(gy, relu_output, i, ch, k))
        total += g
        total_x += g * xhat[i, ch, k]
    return total, total_x


@njit(cache=True)
def _coefficients(sum_g, sum_g_xhat, count, invstd, weight, ch, training, dtype):
    """(w invstd, mean g, mean g xhat) of channel ch in ``dtype`` (the means are 0 in eval mode)."""
    scale = np.float64(invstd[ch]) * (1.0 if weight is None else np.float64(weight[ch]))
    if not training:
        return dtype(scale), dtype(0), dtype(0)
    return dtype(scale), dtype(sum_g / count), dtype(sum_g_xhat / count)


@njit(cache=True)
def _plane_grad_input(gy, xhat, relu_output, i, ch, scale, mean_g, mean_g_xhat, gx):
    """gx = scale (g - mean_g - xhat mean_g_xhat) over plane (i, ch)."""
    for k in range(gy.shape[2]):
        gx[i, ch, k] = scale * (_gradient(gy, relu_output, i, ch, k) - mean_g - xhat[i, ch, k] * mean_g_xhat)


@njit(parallel=True, cache=True)
def _backward_by_channel(gy, xhat, relu_output, invstd, weight, training, gx, gweight, gbias):
    """One channel per task: its sums, then its gx, while its planes are still in the core's L2."""
    n, c, length = gy.shape
    dtype = gy.dtype.type
    for ch in prange(c):
        s1, s2 = 0.0, 0.0
        for i in range(n):
            plane_g, plane_g_xhat = _plane_gradient_sums(gy, xhat, relu_output, i, ch)
            s1 += plane_g
            s2 += plane_g_xhat
        gbias[ch], gweight[ch] = s1, s2
        scale, mean_g, mean_g_xhat = _coefficients(s1, s2, n * length, invstd, weight, ch, training, dtype)
        for i in range(n):
            _plane_grad_input(gy, xhat, relu_output, i, ch, scale, mean_g, mean_g_xhat, gx)


@njit(parallel=True, cache=True)
def _backward_by_plane(gy, xhat, relu_output, invstd, weight, training, gx, gweight, gbias):
    """One plane per task (for fewer channels than threads): all sums, each channel's totals, then gx.
    The sums are added in the same order as ``_backward_by_channel``: the same bits."""
    n, c, length = gy.shape
    dtype = gy.dtype.type
    planes = np.empty((n, c, 2))
    for p in prange(n * c):
        i, ch = p // c, p % c
        planes[i, ch, 0], planes[i, ch, 1] = _plane_gradient_sums(gy, xhat, relu_output, i, ch)
    coefficients = np.empty((c, 3), gy.dtype)
    for ch in range(c):
        s1, s2 = 0.0, 0.0
        for i in range(n):
            s1 += planes[i, ch, 0]
            s2 += planes[i, ch, 1]
        gbias[ch], gweight[ch] = s1, s2
        coefficients[ch, 0], coefficients[ch, 1], coefficients[ch, 2] = _coefficients(
            s1, s2, n * length, invstd, weight, ch, training, dtype
        )
    for p in prange(n * c):
        i, ch = p // c, p % c
        _plane_grad_input(gy, xhat, relu_output, i, ch, coefficients[ch, 0], coefficients[ch, 1], coefficients[ch, 2], gx)


def batch_norm_stats(x):
    """(mean, var) per channel, biased var: one read of x, float64 chunk statistics merged exactly."""
    c = x.shape[1]
    mean, var = np.empty(c, x.dtype), np.empty(c, x.dtype)
    _stats_kernel(_planes(x), CHUNK, mean, var)
    return mean, var


def batch_norm_forward(x, mean, var, weight, bias, eps, relu=False):
    """(y, xhat, invstd) with invstd = 1/sqrt(var + eps); relu=True fuses y = max(y, 0)."""
    y, xhat, invstd = np.empty_like(x), np.empty_like(x), np.empty(x.shape[1], x.dtype)
    _forward_kernel(_planes(x), mean, var, weight, bias, float(eps), bool(relu), _planes(y), _planes(xhat), invstd)
    return y, xhat, invstd


def batch_norm_backward(gy, xhat, invstd, weight, training, relu_output=None):
    """(gx, gweight, gbias); gweight and gbias are always returned (see the reference).

    relu_output: the fused forward's y; the gradient then flows only where y > 0.
    """
    c = gy.shape[1]
    gx, gweight, gbias = np.empty_like(gy), np.empty(c, gy.dtype), np.empty(c, gy.dtype)
    mask = None if relu_output is None else _planes(relu_output)
    kernel = _backward_by_channel if c >= numba.get_num_threads() else _backward_by_plane
    kernel(_planes(gy), _planes(xhat), mask, invstd, weight, bool(training), _planes(gx), gweight, gbias)
    return gx, gweight, gbias
