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

import numpy as np
from numba import njit, prange

__all__ = ["batch_norm_stats", "batch_norm_forward", "batch_norm_backward"]

CHUNK = 2048  # values per statistics chunk: 8 KiB of float32, read twice from L1


def _planes(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


@njit(fastmath={"reassoc"}, cache=True)
def _sum(a, start, stop):
    """sum a[start:stop] in float64 (vectorised: reassoc lets LLVM keep several partial sums)."""
    acc = 0.0
    for k in range(start, stop):
        acc += np.float64(a[k])
    return acc


@njit(fastmath={"reassoc"}, cache=True)
def _squared_deviations(a, start, stop, centre):
    """sum (a[start:stop] - centre)^2 in float64 (vectorised like ``_sum``)."""
    acc = 0.0
    for k in range(start, stop):
        d = np.float64(a[k]) - centre
        acc += d * d
    return acc


@njit(cache=True)
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(mean, M2) of the union of two sets of n_a and n_b values from each set's (mean, M2).

    Chan et al. (1979), with d = mean_b - mean_a and n = n_a + n_b:
    mean = mean_a + d n_b / n, M2 = M2_a + M2_b + d^2 n_a n_b / n (no cancelling terms).
    """
    n = n_a + n_b
    d = mean_b - mean_a
    return mean_a + d * (n_b / n), m2_a + m2_b + d * d * (n_a * (n_b / n))


@njit(parallel=True, cache=True)
def _plane_stats(x, chunk):
    """out[n, c] = (mean, M2) of each plane of x (N, C, L), one read of x: chunks merged with Chan's formula."""
    n, c, length = x.shape
    out = np.empty((n, c, 2))
    for p in prange(n * c):
        i, ch = p // c, p % c
        plane = x[i, ch]
        count, mean, m2 = 0, 0.0, 0.0
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            size = stop - start
            chunk_mean = _sum(plane, start, stop) / size
            chunk_m2 = _squared_deviations(plane, start, stop, chunk_mean)
            mean, m2 = _chan_merge(count, mean, m2, size, chunk_mean, chunk_m2)
            count += size
        out[i, ch, 0] = mean
        out[i, ch, 1] = m2
    return out


@njit(parallel=True, cache=True)
def _forward_kernel(x, mean, invstd, w, b, relu, y, xhat):
    """xhat = (x - mean) invstd, y = w xhat + b (then max(y, 0) if relu), per plane."""
    n, c, length = x.shape
    zero = y.dtype.type(0)
    for p in prange(n * c):
        i, ch = p // c, p % c
        m, s, wc, bc = mean[ch], invstd[ch], w[ch], b[ch]
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


@njit(parallel=True, fastmath={"reassoc"}, cache=True)
def _backward_sums(gy, xhat, relu_output):
    """out[n, c] = (sum g, sum g xhat) over each plane in float64, g = gy masked by the fused ReLU."""
    n, c, length = gy.shape
    out = np.empty((n, c, 2))
    for p in prange(n * c):
        i, ch = p // c, p % c
        s1 = 0.0
        s2 = 0.0
        for k in range(length):
            g = np.float64(_gradient(gy, relu_output, i, ch, k))
            s1 += g
            s2 += g * xhat[i, ch, k]
        out[i, ch, 0] = s1
        out[i, ch, 1] = s2
    return out


@njit(parallel=True, cache=True)
def _backward_kernel(gy, xhat, relu_output, scale, mean_gy, mean_gy_xhat, gx):
    """gx = scale (g - mean_gy - xhat mean_gy_xhat), per plane (the means are 0 in eval mode)."""
    n, c, length = gy.shape
    for p in prange(n * c):
        i, ch = p // c, p % c
        s, m1, m2 = scale[ch], mean_gy[ch], mean_gy_xhat[ch]
        for k in range(length):
            gx[i, ch, k] = s * (_gradient(gy, relu_output, i, ch, k) - m1 - xhat[i, ch, k] * m2)


def batch_norm_stats(x):
    """(mean, var) per channel, biased var: one read of x, float64 chunk statistics merged exactly."""
    xp = _planes(x)
    length = xp.shape[2]
    plane = _plane_stats(xp, CHUNK)
    plane_mean, plane_m2 = plane[:, :, 0], plane[:, :, 1]
    mean = plane_mean.mean(axis=0)
    m2 = plane_m2.sum(axis=0) + length * ((plane_mean - mean) ** 2).sum(axis=0)
    return mean.astype(x.dtype), (m2 / (xp.shape[0] * length)).astype(x.dtype)


def batch_norm_forward(x, mean, var, weight, bias, eps, relu=False):
    """(y, xhat, invstd) with invstd = 1/sqrt(var + eps); relu=True fuses y = max(y, 0)."""
    c = x.shape[1]
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(x.dtype)
    w = np.ones(c, x.dtype) if weight is None else weight
    b = np.zeros(c, x.dtype) if bias is None else bias
    y, xhat = np.empty_like(x), np.empty_like(x)
    _forward_kernel(_planes(x), mean, invstd, w, b, bool(relu), _planes(y), _planes(xhat))
    return y, xhat, invstd


def batch_norm_backward(gy, xhat, invstd, weight, training, relu_output=None):
    """(gx, gweight, gbias); gweight and gbias are always returned (see the reference).

    relu_output: the fused forward's y; the gradient then flows only where y > 0.
    """
    gyp, xp = _planes(gy), _planes(xhat)
    mask = None if relu_output is None else _planes(relu_output)
    gbias, gweight = _backward_sums(gyp, xp, mask).sum(axis=0).T
    scale = invstd.astype(np.float64) if weight is None else invstd * weight.astype(np.float64)
    count = gyp.shape[0] * gyp.shape[2]
    means = (gbias / count, gweight / count) if training else (np.zeros_like(gbias),) * 2
    gx = np.empty_like(gy)
    _backward_kernel(gyp, xp, mask, scale.astype(gy.dtype), *(m.astype(gy.dtype) for m in means), _planes(gx))
    return gx, gweight.astype(gy.dtype), gbias.astype(gy.dtype)
