"""Batch normalisation (and batch norm fused with the ReLU after it) on the CPU (Numba).

Read ``reference.py`` first for the math and the backward derivation. The
input is seen as (N, C, L) planes, L = H * W, each plane contiguous. A batch-norm
layer is memory-bound (a few flops per value), so the aim is to read and write
every array as few times as possible, with inner loops fast enough that memory,
not arithmetic, sets the time. Each exported function is one Numba call (invstd,
the default weight and bias, the merges over N happen inside the kernels: no
NumPy glue per call, which costs as much as the arithmetic on small layers).

* **statistics: one read of x** (v1 made two: the mean, then the squared
  deviations). Planes in parallel; each plane in chunks of CHUNK values, and per
  chunk one loop of shifted sums, sum d and sum d^2 with d = x - c::

      mean = c + sum d / n,      M2 = sum d^2 - (sum d)^2 / n

  which holds for any centre c; the one-pass E[x^2] - E[x]^2 is c = 0, which
  cancels every digit when |mean| >> std. Here c is the plane's mean so far, and
  for its first chunk the chunk's own mean (one extra loop over 1 KiB, from L1).
  The chunks' (mean, M2) are merged with Chan's formula (``_chan_merge``), then
  the planes of each channel in a fixed order (deterministic), all in float64.
  Why the shift is safe: the rounding of the sums is relative to sum d^2 =
  M2_chunk + n (c - mean_chunk)^2. For the first chunk c is its mean; for a later
  one, (c - mean_chunk)^2 is the distance that Chan's merge adds to M2 as its
  between-chunks term, n_a n / (n_a + n) (c - mean_chunk)^2 >= n/2 (c -
  mean_chunk)^2. So the rounding stays a small multiple of the rounding of the
  squared deviations themselves, and nothing large cancels.
* **vectorised sums.** A plain ``acc += v`` loop is one chain of dependent
  additions, each waiting for the previous one (the adder's latency per value,
  slower than memory). The reduction helpers carry ``fastmath={"reassoc"}``,
  which lets LLVM keep several vector accumulators and add them at the end; no
  other IEEE rule is relaxed (no contraction into FMAs, NaN and inf kept, and
  without ``nsz`` LLVM does not reassociate the rest of the arithmetic), and the
  shift d = x - c is computed outside the flagged code (``_difference``). The
  order is fixed by the compiled loop, so a run is deterministic.
* **float32 partial sums in the statistics.** A chunk's sums are accumulated in
  the input's dtype: 8 float32 lanes per AVX2 vector instead of 4 float64, and no
  conversions. In one process, interleaved, one thread, on a loaded machine
  (indicative, not a benchmark), that took about 0.6x the time of the same loop
  in float64. The cost in accuracy, an estimate from the standard bound: 256
  values over at least 8 vector lanes are at most 32 float32 additions per
  partial sum, a relative error of at most 32 x 2^-24 ~ 2e-6 of sum d^2, so by
  the argument above at most ~3x that of M2 (float32 data carries 2^-24 ~ 6e-8
  of its own rounding); every total beyond a chunk is float64. The backward's
  sums are float64 throughout: they read three arrays and are memory-bound, so
  float32 gained nothing there (same kind of comparison).
* **forward**: one pass reading x and writing xhat = (x - mean) invstd and
  y = w xhat + b, or max(w xhat + b, 0) with the fused ReLU (``relu=True``).
* **backward**: sum(g) and sum(g xhat) per channel (gbias and gweight, which give
  the two means of the training-mode formula), then gx. With the fused ReLU
  g = gy where y > 0, else 0, read in both loops from the saved output y: the
  masked gradient is never written. When there are at least as many channels as
  threads, each task takes a whole channel: its sums, then its gx, while its
  planes are still in the core's L2 cache (2 MiB per core on the development
  machine, by lscpu; a U-Net channel of 8 x 64 x 64 is 384 KiB over gy, xhat and
  y), so the second loop does not go back to memory; with fewer channels each
  task takes a plane (two parallel loops). Both add the same numbers in the same
  order.

* **an absent argument is an empty array**: a layer without weight and bias (``affine=False``)
  or without running statistics passes None; the wrappers hand the kernels an empty array in
  its place (``kernels.memory.given``), which they test by its length once per channel or
  plane. With None, the four None-able arguments made 16 compilations of the training kernel
  per dtype (and of every fused kernel that calls it); now there is one. The fused ReLU's mask
  (``relu_output``) stays None-able: it is read in the inner loop, where a compiled-out test
  is worth a compilation.

Why the forward still writes xhat: the backward could recompute it from x, mean
and invstd, saving one write per value in the forward. But x would then have to
stay alive instead of xhat (the same memory), every backend and the synchronised
batch norm share the (y, xhat, invstd) interface, and the backward reads one of
x or xhat either way. The write was kept: it is the one pass over memory this
design leaves on the table.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from kernels.memory import empty_aligned, given

__all__ = ["batch_norm_stats", "batch_norm_forward", "batch_norm_training", "batch_norm_backward"]

CHUNK = 256  # values per statistics chunk (1 KiB of float32): partial sums in the input's dtype


def _planes(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


@njit(cache=True)
def _difference(a, k, centre):
    """a[k] - centre, outside the ``reassoc`` helpers: no compiler may fold the shift into the sums."""
    return a[k] - centre


@njit(fastmath={"reassoc"}, cache=True)
def _sum(a, start, stop):
    """sum a[start:stop] as float64, accumulated in a's dtype (vectorised)."""
    acc = a.dtype.type(0)
    for k in range(start, stop):
        acc += a[k]
    return np.float64(acc)


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
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        size = stop - start
        # d = x - c: M2 = sum d^2 - (sum d)^2 / size holds for any centre c; c = the mean so far,
        # and for the first chunk its own mean (one more loop over it, in L1)
        c = plane.dtype.type(mean if count else _sum(plane, start, stop) / size)
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
    y = w xhat + b (then max(y, 0) if relu), per plane; an empty weight is 1, an empty bias 0."""
    n, c, length = x.shape
    one, zero = x.dtype.type(1), x.dtype.type(0)
    for ch in range(c):
        invstd[ch] = 1.0 / np.sqrt(np.float64(var[ch]) + eps)
    for p in prange(n * c):
        i, ch = p // c, p % c
        m, s = mean[ch], invstd[ch]
        wc = weight[ch] if weight.shape[0] else one
        bc = bias[ch] if bias.shape[0] else zero
        for k in range(length):
            v = (x[i, ch, k] - m) * s
            xhat[i, ch, k] = v
            out = v * wc + bc
            # ``not out <= 0`` keeps a NaN, as torch's relu
            y[i, ch, k] = out if not (relu and out <= 0) else zero


@njit(cache=True)
def _update_running(running, batch, keep, weight):
    """running = keep running + weight batch, in running's dtype: the reference's in-place
    ``*=`` and ``+=`` (each rounds to that dtype), the same numbers; nothing where running is empty."""
    if running.shape[0]:
        keep, weight = running.dtype.type(keep), running.dtype.type(weight)
        for ch in range(running.shape[0]):
            running[ch] = running[ch] * keep + weight * batch[ch]


@njit(cache=True)  # the two kernels it calls run their own parallel loops
def _training_kernel(x, chunk, weight, bias, running_mean, running_var, momentum, eps, relu, mean, var, y, xhat, invstd):
    """The statistics, the running-statistic update and the forward of a training step in one
    call from Python: every call from Python costs microseconds of dispatch, and it runs for
    every batch-norm layer of every step."""
    _stats_kernel(x, chunk, mean, var)
    count = x.shape[0] * x.shape[2]
    _update_running(running_mean, mean, 1.0 - momentum, momentum)
    _update_running(running_var, var, 1.0 - momentum, momentum * count / (count - 1))
    _forward_kernel(x, mean, var, weight, bias, eps, relu, y, xhat, invstd)


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
    """(w invstd, mean g, mean g xhat) of channel ch in ``dtype`` (w = 1 where weight is empty; the means
    are 0 in eval mode)."""
    scale = np.float64(invstd[ch]) * (np.float64(weight[ch]) if weight.shape[0] else 1.0)
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
    _forward_kernel(_planes(x), mean, var, given(weight, x.dtype), given(bias, x.dtype), float(eps), bool(relu),
                    _planes(y), _planes(xhat), invstd)
    return y, xhat, invstd


def batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    """(y, xhat, invstd) normalised with the batch's statistics, which also update the running ones
    in place (either may be None): ``batch_norm_stats``, the update and ``batch_norm_forward`` in one Numba call."""
    outputs, args = training_kernel_call(x, weight, bias, running_mean, running_var, momentum, eps, relu)
    _training_kernel(*args)
    return outputs


def training_kernel_call(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    """((y, xhat, invstd), the arguments of ``_training_kernel``): ``batch_norm_training`` up to its
    compiled call, which fills the outputs. ``x`` need only have its shape yet: a fused op
    (``kernels/conv2d_batch_norm``) fills it in the same compiled call, just before."""
    c = x.shape[1]
    mean, var, invstd = np.empty(c, x.dtype), np.empty(c, x.dtype), np.empty(c, x.dtype)
    y, xhat = np.empty_like(x), np.empty_like(x)
    present = [given(a, x.dtype) for a in (weight, bias, running_mean, running_var)]
    args = (_planes(x), CHUNK, *present, float(momentum), float(eps), bool(relu), mean, var, _planes(y), _planes(xhat), invstd)
    return (y, xhat, invstd), args


def batch_norm_backward(gy, xhat, invstd, weight, training, relu_output=None):
    """(gx, gweight, gbias); gweight and gbias are always returned (see the reference).

    relu_output: the fused forward's y; the gradient then flows only where y > 0.
    """
    outputs, by_channel, args = backward_kernel_call(gy, xhat, invstd, weight, training, relu_output)
    (_backward_by_channel if by_channel else _backward_by_plane)(*args)
    return outputs


def backward_kernel_call(gy, xhat, invstd, weight, training, relu_output=None):
    """((gx, gweight, gbias), by_channel, the kernel's arguments): ``batch_norm_backward`` up to its
    compiled call (``_backward_by_channel`` when ``by_channel``, else ``_backward_by_plane``), which
    fills the outputs. For ``kernels/conv2d_batch_norm``, which runs it with the conv's gradients."""
    c = gy.shape[1]
    gx, gweight, gbias = empty_aligned(gy.shape, gy.dtype), np.empty(c, gy.dtype), np.empty(c, gy.dtype)
    mask = None if relu_output is None else _planes(relu_output)
    args = (_planes(gy), _planes(xhat), mask, invstd, given(weight, gy.dtype), bool(training), _planes(gx), gweight, gbias)
    return (gx, gweight, gbias), c >= numba.get_num_threads(), args
