"""Batch normalisation on the CPU (Numba).

Read ``reference.py`` first for the math and the backward derivation. The
input is seen as (N, C, L) planes, L = H * W, each plane contiguous. Every
pass is parallel over the N * C planes and runs a contiguous, vectorised loop
inside each plane:

* statistics: two passes (plane sums -> mean, then plane sums of squared
  deviations -> biased variance), accumulated in float64 so that float32
  inputs with |mean| >> std lose nothing; the N partial sums of a channel are
  added afterwards, in a fixed order (deterministic);
* forward: one pass writing xhat = (x - mean) invstd and y = w xhat + b;
* backward: one reduction pass for sum(gy) and sum(gy xhat) per plane (which
  are gbias and gweight, and give the two means of the training-mode formula),
  then one elementwise pass for gx.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["batch_norm_stats", "batch_norm_forward", "batch_norm_backward"]


def _planes(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


@njit(parallel=True, cache=True)
def _plane_sums(a, b):
    """out[n, c] = (sum_l a, sum_l a * b) over each plane, in float64."""
    n, c, length = a.shape
    out = np.empty((n, c, 2))
    for p in prange(n * c):
        i, ch = p // c, p % c
        s1 = 0.0
        s2 = 0.0
        for k in range(length):
            v = np.float64(a[i, ch, k])
            s1 += v
            s2 += v * b[i, ch, k]
        out[i, ch, 0] = s1
        out[i, ch, 1] = s2
    return out


@njit(parallel=True, cache=True)
def _plane_squared_deviations(a, centre):
    """out[n, c] = sum_l (a - centre[c])^2 over each plane, in float64."""
    n, c, length = a.shape
    out = np.empty((n, c))
    for p in prange(n * c):
        i, ch = p // c, p % c
        acc = 0.0
        for k in range(length):
            d = np.float64(a[i, ch, k]) - centre[ch]
            acc += d * d
        out[i, ch] = acc
    return out


@njit(parallel=True, cache=True)
def _forward_kernel(x, mean, invstd, w, b, y, xhat):
    """xhat = (x - mean) invstd, y = w xhat + b, per plane."""
    n, c, length = x.shape
    for p in prange(n * c):
        i, ch = p // c, p % c
        m, s, wc, bc = mean[ch], invstd[ch], w[ch], b[ch]
        for k in range(length):
            v = (x[i, ch, k] - m) * s
            xhat[i, ch, k] = v
            y[i, ch, k] = v * wc + bc


@njit(parallel=True, cache=True)
def _backward_kernel(gy, xhat, scale, mean_gy, mean_gy_xhat, gx):
    """gx = scale (gy - mean_gy - xhat mean_gy_xhat), per plane (the means are 0 in eval mode)."""
    n, c, length = gy.shape
    for p in prange(n * c):
        i, ch = p // c, p % c
        s, m1, m2 = scale[ch], mean_gy[ch], mean_gy_xhat[ch]
        for k in range(length):
            gx[i, ch, k] = s * (gy[i, ch, k] - m1 - xhat[i, ch, k] * m2)


def batch_norm_stats(x):
    """(mean, var) per channel, biased var, float64 two-pass accumulation."""
    xp = _planes(x)
    count = xp.shape[0] * xp.shape[2]
    mean = _plane_sums(xp, xp)[:, :, 0].sum(axis=0) / count
    var = _plane_squared_deviations(xp, mean).sum(axis=0) / count
    return mean.astype(x.dtype), var.astype(x.dtype)


def batch_norm_forward(x, mean, var, weight, bias, eps):
    """(y, xhat, invstd) with invstd = 1/sqrt(var + eps)."""
    c = x.shape[1]
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(x.dtype)
    w = np.ones(c, x.dtype) if weight is None else weight
    b = np.zeros(c, x.dtype) if bias is None else bias
    y, xhat = np.empty_like(x), np.empty_like(x)
    _forward_kernel(_planes(x), mean, invstd, w, b, _planes(y), _planes(xhat))
    return y, xhat, invstd


def batch_norm_backward(gy, xhat, invstd, weight, training):
    """(gx, gweight, gbias); gweight and gbias are always returned (see the reference)."""
    gyp, xp = _planes(gy), _planes(xhat)
    gbias, gweight = _plane_sums(gyp, xp).sum(axis=0).T
    scale = invstd.astype(np.float64) if weight is None else invstd * weight.astype(np.float64)
    count = gyp.shape[0] * gyp.shape[2]
    means = (gbias / count, gweight / count) if training else (np.zeros_like(gbias),) * 2
    gx = np.empty_like(gy)
    _backward_kernel(gyp, xp, scale.astype(gy.dtype), *(m.astype(gy.dtype) for m in means), _planes(gx))
    return gx, gweight.astype(gy.dtype), gbias.astype(gy.dtype)
