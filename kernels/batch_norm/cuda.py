"""Batch normalisation on the GPU (Numba CUDA): per-channel block reductions and elementwise passes.

Read ``reference.py`` first: it defines the statistics and derives the backward.
Every array is seen as (N, C, S), S = the product of the spatial sizes (free
for a C-contiguous array); a channel's M = N*S values are N runs of S
consecutive addresses.

* **batch_norm_stats** -- one block per channel. Its threads stride over the
  channel's M values (thread t takes m = t, t + T, ...; consecutive threads read
  consecutive addresses of a run: coalesced), each adds its share, and a
  shared-memory tree reduction (``cuda_common.block_sum``) adds the threads'
  partial sums (blocks of 32 to 128 threads: a power of two no larger than
  needed, so short channels idle no threads). Two passes as in the reference
  -- the mean, then the mean squared deviation from it -- in float64
  accumulators: the one-pass E[x^2] - E[x]^2 cancels catastrophically when
  |mean| >> std, and float64 keeps long float32 sums exact enough (a few extra
  float64 adds per loaded value; the kernel is bound by memory, not by them).
  The second pass re-reads the channel, from L2 when it fits.
* **batch_norm_forward** -- a tiny kernel computes invstd = 1/sqrt(var + eps)
  per channel (C threads, float64 like the reference), then one thread per
  element writes xhat and y: one read of x, two coalesced writes.
* **batch_norm_backward** -- one block per channel reduces gbias = sum gy and
  gweight = sum gy*xhat together (one read of gy and xhat, two block sums),
  then one thread per element applies
  ``gx = w invstd (gy - gbias/M - xhat gweight/M)`` (training) or
  ``gx = w invstd gy`` (evaluation).

One block per channel keeps every reduction deterministic without atomics;
with few channels and huge images a split over several blocks per channel
(partial sums, then a second pass, as the cross-entropy does) would fill more
of the GPU.
"""
from __future__ import annotations

import math

from numba import cuda, float64

from kernels import cuda_common as cc

__all__ = ["batch_norm_stats", "batch_norm_forward", "batch_norm_backward"]

THREADS = 128  # block size of the elementwise kernels; the reductions' shared buffers have this many slots


def _ncs(a):
    """``a`` (N, C, ...) as the (N, C, S) view."""
    return a.reshape(a.shape[0], a.shape[1], -1)


@cuda.jit
def _stats_kernel(x, mean, var):
    """Block c: mean[c] and biased var[c] over x[:, c, :], two passes, float64 sums."""
    buf = cuda.shared.array(THREADS, dtype=float64)
    c = cuda.blockIdx.x
    n_img, _, n_s = x.shape
    m_total = n_img * n_s
    acc = float64(0)
    for m in range(cuda.threadIdx.x, m_total, cuda.blockDim.x):
        acc += x[m // n_s, c, m % n_s]
    mu = cc.block_sum(acc, buf) / m_total
    acc = float64(0)
    for m in range(cuda.threadIdx.x, m_total, cuda.blockDim.x):
        d = x[m // n_s, c, m % n_s] - mu
        acc += d * d
    sq = cc.block_sum(acc, buf)
    if cuda.threadIdx.x == 0:
        mean[c] = mu
        var[c] = sq / m_total


def batch_norm_stats(x):
    """(mean, var) per channel (biased var), one block per channel."""
    x = cc.as_input(x)
    c = x.shape[1]
    mean = cc.empty((c,), x.dtype)
    var = cc.empty((c,), x.dtype)
    _stats_kernel[c, cc.reduce_threads(x.size // c, THREADS)](_ncs(x), mean, var)
    return mean, var


@cuda.jit
def _invstd_kernel(var, eps, invstd):
    """Thread c: invstd[c] = 1/sqrt(var[c] + eps), in float64 like the reference."""
    c = cuda.grid(1)
    if c < var.size:
        invstd[c] = 1.0 / math.sqrt(float64(var[c]) + eps)


@cuda.jit
def _forward_kernel(x, mean, invstd, weight, has_weight, bias, has_bias, y, xhat):
    """Thread e: xhat = (x - mean[c]) invstd[c], y = xhat w[c] + b[c] for element e of (N, C, S)."""
    e = cuda.grid(1)
    n_img, n_c, n_s = x.shape
    if e >= n_img * n_c * n_s:
        return
    n, c, s = cc.unravel3(e, n_c, n_s)
    xh = (x[n, c, s] - mean[c]) * invstd[c]
    xhat[n, c, s] = xh
    v = xh * weight[c] if has_weight else xh
    y[n, c, s] = v + bias[c] if has_bias else v


def _optional(a, like):
    """(array, present) for an optional per-channel parameter; a 1-element dummy stands in for None."""
    if a is None:
        return cc.zeros((1,), like.dtype), False
    return cc.as_input(a, like.dtype), True


def batch_norm_forward(x, mean, var, weight, bias, eps):
    """(y, xhat, invstd) with invstd = 1/sqrt(var + eps) and y = xhat * weight + bias."""
    x = cc.as_input(x)
    mean, var = cc.as_input(mean, x.dtype), cc.as_input(var, x.dtype)
    c = x.shape[1]
    invstd = cc.empty((c,), x.dtype)
    _invstd_kernel[cc.blocks(c, THREADS), THREADS](var, float(eps), invstd)
    y = cc.empty(x.shape, x.dtype)
    xhat = cc.empty(x.shape, x.dtype)
    _forward_kernel[cc.blocks(x.size, THREADS), THREADS](
        _ncs(x), mean, invstd, *_optional(weight, x), *_optional(bias, x), _ncs(y), _ncs(xhat)
    )
    return y, xhat, invstd


@cuda.jit
def _param_grad_kernel(gy, xhat, gweight, gbias):
    """Block c: gbias[c] = sum gy[:, c, :], gweight[c] = sum gy * xhat (float64 sums, one read of each)."""
    buf = cuda.shared.array(THREADS, dtype=float64)
    c = cuda.blockIdx.x
    n_img, _, n_s = gy.shape
    acc_b = float64(0)
    acc_w = float64(0)
    for m in range(cuda.threadIdx.x, n_img * n_s, cuda.blockDim.x):
        g = float64(gy[m // n_s, c, m % n_s])
        acc_b += g
        acc_w += g * xhat[m // n_s, c, m % n_s]
    sum_b = cc.block_sum(acc_b, buf)
    sum_w = cc.block_sum(acc_w, buf)
    if cuda.threadIdx.x == 0:
        gbias[c] = sum_b
        gweight[c] = sum_w


@cuda.jit
def _grad_input_kernel(gy, xhat, invstd, weight, has_weight, gweight, gbias, training, gx):
    """Thread e: gx = w invstd (gy - gbias/M - xhat gweight/M) if training, else w invstd gy."""
    e = cuda.grid(1)
    n_img, n_c, n_s = gy.shape
    if e >= n_img * n_c * n_s:
        return
    n, c, s = cc.unravel3(e, n_c, n_s)
    scale = invstd[c] * weight[c] if has_weight else invstd[c]
    g = gy[n, c, s]
    if training:
        m_total = gy.dtype.type(n_img * n_s)
        g = g - gbias[c] / m_total - xhat[n, c, s] * (gweight[c] / m_total)
    gx[n, c, s] = scale * g


def batch_norm_backward(gy, xhat, invstd, weight, training):
    """(gx, gweight, gbias): one reduction block per channel, then one thread per element."""
    gy = cc.as_input(gy)
    xhat, invstd = cc.as_input(xhat, gy.dtype), cc.as_input(invstd, gy.dtype)
    c = gy.shape[1]
    gweight = cc.empty((c,), gy.dtype)
    gbias = cc.empty((c,), gy.dtype)
    _param_grad_kernel[c, cc.reduce_threads(gy.size // c, THREADS)](_ncs(gy), _ncs(xhat), gweight, gbias)
    gx = cc.empty(gy.shape, gy.dtype)
    _grad_input_kernel[cc.blocks(gy.size, THREADS), THREADS](
        _ncs(gy), _ncs(xhat), invstd, *_optional(weight, gy), gweight, gbias, bool(training), _ncs(gx)
    )
    return gx, gweight, gbias


def _signatures(template):
    """PTX signatures for float32 and float64; {A} is a C-contiguous (N, C, S) float array."""
    return cc.float_signatures(template, A="{t}[:, :, ::1]")


PTX_SIGNATURES = [
    (_stats_kernel, _signatures("void({A}, {t}[::1], {t}[::1])")),
    (_invstd_kernel, _signatures("void({t}[::1], float64, {t}[::1])")),
    (_forward_kernel, _signatures("void({A}, {t}[::1], {t}[::1], {t}[::1], boolean, {t}[::1], boolean, {A}, {A})")),
    (_param_grad_kernel, _signatures("void({A}, {A}, {t}[::1], {t}[::1])")),
    (
        _grad_input_kernel,
        _signatures("void({A}, {A}, {t}[::1], {t}[::1], boolean, {t}[::1], {t}[::1], boolean, {A})"),
    ),
]
