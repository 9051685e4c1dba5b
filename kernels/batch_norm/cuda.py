"""Batch normalisation on the GPU (Numba CUDA): split per-channel reductions and elementwise passes.

Read ``reference.py`` first: it defines the statistics and derives the backward.
Every array is seen as (N, C, S), S = the product of the spatial sizes (free
for a C-contiguous array); a channel's M = N*S values are N runs of S
consecutive addresses.

* **batch_norm_stats** -- one read of x. A grid of channels x splits
  (``cuda_common.splits``: at least two blocks per SM of an H100 -- 16 channels
  get 17 splits each), each block taking a contiguous range of its channel.
  Each thread loads UNROLL values (independent loads in flight), folds them
  into its running (count, mean, M2) with Chan's merge
  (``cuda_common.chan_merge``, float64), and the block merges its threads'
  triples with warp shuffles (``cuda_common.block_chan_merge``) into
  partials[:, c, split]. A second kernel merges each channel's splits in a
  fixed order: mean = the merged mean, var = M2 / M. The merge adds squared
  deviations, never sum x^2 - M mean^2, so it is as accurate as the
  reference's two passes when |mean| >> std, with half the reads.
* **batch_norm_forward** -- a tiny kernel computes invstd = 1/sqrt(var + eps)
  per channel (C threads, float64 like the reference), then one thread per
  element writes xhat and y: one read of x, two coalesced writes. With the
  fused ReLU (``relu=True``) the thread writes max(y, 0) instead of y.
* **batch_norm_backward** -- gbias = sum gy and gweight = sum gy*xhat come from
  ``cuda_common.channel_sums`` (the same channels x splits grid, one read of gy
  and xhat, float64 sums, a fixed-order pass over the splits), then one thread
  per element applies ``gx = w invstd (gy - gbias/M - xhat gweight/M)``
  (training) or ``gx = w invstd gy`` (evaluation). With the fused ReLU
  (``relu_output``, the forward's y) both kernels read gy as 0 where y <= 0:
  the masked gradient is never written.

Both reductions are deterministic (no atomics: the splits are added in a fixed
order). They replace v1, one block of <= 128 threads per channel with a
two-pass mean/variance: 16 to 128 blocks cannot fill 132 SMs (the one-block-
per-output pattern remains, as a first version, in conv2d's grad_weight v1).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from kernels import cuda_common as cc

__all__ = ["batch_norm_stats", "batch_norm_forward", "batch_norm_training", "batch_norm_backward"]

THREADS = 128  # block size of the elementwise kernels
# Module-level ints are compile-time constants to Numba (an attribute of another module is not).
_UNROLL = cc.UNROLL
_MERGE_SLOTS = (3, cc.WARP)  # (count, mean, M2) per warp


def _ncs(a):
    """``a`` (N, C, ...) as the (N, C, S) view."""
    return a.reshape(a.shape[0], a.shape[1], -1)


@cuda.jit
def _stats_partials_kernel(x, split_len, partials):
    """Block (c, j): (count, mean, M2) of split j of channel c into partials[:, c, j] (float64)."""
    slots = cuda.shared.array(_MERGE_SLOTS, dtype=float64)
    c = cuda.blockIdx.x
    j = cuda.blockIdx.y
    n_img, _, n_s = x.shape
    start = j * split_len
    stop = min(start + split_len, n_img * n_s)
    step = cuda.blockDim.x
    count = float64(0)
    mean = float64(0)
    m2 = float64(0)
    v = cuda.local.array(_UNROLL, float64)
    for base in range(start + cuda.threadIdx.x, stop, step * _UNROLL):
        k = 0
        for u in range(_UNROLL):  # the loads first: UNROLL independent requests in flight
            m = base + u * step
            if m < stop:
                v[u] = x[m // n_s, c, m % n_s]
                k += 1
        # the k loaded values as one small set (its mean, its M2), merged into the thread's
        chunk_mean = float64(0)
        for u in range(k):
            chunk_mean += v[u]
        chunk_mean /= k
        chunk_m2 = float64(0)
        for u in range(k):
            d = v[u] - chunk_mean
            chunk_m2 += d * d
        count, mean, m2 = cc.chan_merge(count, mean, m2, float64(k), chunk_mean, chunk_m2)
    count, mean, m2 = cc.block_chan_merge(count, mean, m2, slots)
    if cuda.threadIdx.x == 0:
        partials[0, c, j] = count
        partials[1, c, j] = mean
        partials[2, c, j] = m2


@cuda.jit
def _stats_merge_kernel(partials, keep, mean_weight, var_weight, running_mean, has_mean, running_var, has_var, mean, var):
    """Block c: Chan-merge the splits of channel c in a fixed order; mean[c], var[c] = M2 / count;
    then (training) running = keep running + weight stat, rounded as the reference's ``*=``, ``+=``."""
    slots = cuda.shared.array(_MERGE_SLOTS, dtype=float64)
    c = cuda.blockIdx.x
    count = float64(0)
    mu = float64(0)
    m2 = float64(0)
    for j in range(cuda.threadIdx.x, partials.shape[2], cuda.blockDim.x):
        count, mu, m2 = cc.chan_merge(count, mu, m2, partials[0, c, j], partials[1, c, j], partials[2, c, j])
    count, mu, m2 = cc.block_chan_merge(count, mu, m2, slots)
    if cuda.threadIdx.x == 0:
        mean[c] = mu
        var[c] = m2 / count
        t = mean.dtype.type
        if has_mean:
            running_mean[c] = running_mean[c] * t(keep) + t(mean_weight) * mean[c]
        if has_var:
            running_var[c] = running_var[c] * t(keep) + t(var_weight) * var[c]


def _stats(x, running_mean, running_var, momentum):
    """(mean, var) per channel (biased var): one read of x in channels x splits blocks, then a merge
    pass, which also updates the running statistics given (momentum, unbiased variance)."""
    x = cc.as_input(x)
    xs = _ncs(x)
    n, c, s = xs.shape
    threads = cc.split_threads()
    n_splits = cc.splits(c, n * s, threads * cc.UNROLL)
    partials = cc.empty((3, c, n_splits), np.float64)
    _stats_partials_kernel[(c, n_splits), threads](xs, cc.split_range(n * s, n_splits), partials)
    mean = cc.empty((c,), x.dtype)
    var = cc.empty((c,), x.dtype)
    count = n * s
    unbias = count / (count - 1) if count > 1 else 1.0
    _stats_merge_kernel[c, cc.WARP](
        partials, 1.0 - momentum, momentum, momentum * unbias,
        *_running(running_mean, x), *_running(running_var, x), mean, var,
    )
    return mean, var


def _running(a, like):
    """(array, present) for a running statistic the merge kernel updates in place: the array itself
    (a converted copy would take the update and drop it), or a 1-element dummy for None."""
    if a is None:
        return cc.zeros((1,), like.dtype), False
    if type(a) is not type(like) or a.dtype != like.dtype or not a.flags.c_contiguous:
        raise TypeError(
            f"a running statistic must be a contiguous {type(like).__name__} of the input's dtype {like.dtype} "
            f"(it is updated in place), got a {type(a).__name__} of {a.dtype}"
        )
    return a, True


def batch_norm_stats(x):
    """(mean, var) per channel (biased var): one read of x in channels x splits blocks, then a merge pass."""
    return _stats(x, None, None, 0.0)


def batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    """(y, xhat, invstd) normalised with the batch's statistics; the statistics' merge kernel also
    updates the running ones in place (either may be None): no separate launches for the update."""
    mean, var = _stats(x, running_mean, running_var, float(momentum))
    return batch_norm_forward(x, mean, var, weight, bias, eps, relu)


@cuda.jit
def _invstd_kernel(var, eps, invstd):
    """Thread c: invstd[c] = 1/sqrt(var[c] + eps), in float64 like the reference."""
    c = cuda.grid(1)
    if c < var.size:
        invstd[c] = 1.0 / math.sqrt(float64(var[c]) + eps)


@cuda.jit
def _forward_kernel(x, mean, invstd, weight, has_weight, bias, has_bias, relu, y, xhat):
    """Thread e: xhat = (x - mean[c]) invstd[c], y = xhat w[c] + b[c] (max(., 0) if relu) for element e of (N, C, S)."""
    e = cuda.grid(1)
    n_img, n_c, n_s = x.shape
    if e >= n_img * n_c * n_s:
        return
    n, c, s = cc.unravel3(e, n_c, n_s)
    xh = (x[n, c, s] - mean[c]) * invstd[c]
    xhat[n, c, s] = xh
    v = xh * weight[c] if has_weight else xh
    if has_bias:
        v += bias[c]
    # ``not v <= 0`` keeps a NaN, as torch's relu
    y[n, c, s] = v if not (relu and v <= 0) else y.dtype.type(0)


def _optional(a, like):
    """(array, present) for an optional per-channel parameter; a 1-element dummy stands in for None."""
    if a is None:
        return cc.zeros((1,), like.dtype), False
    return cc.as_input(a, like.dtype), True


def batch_norm_forward(x, mean, var, weight, bias, eps, relu=False):
    """(y, xhat, invstd) with invstd = 1/sqrt(var + eps) and y = xhat * weight + bias (max(y, 0) if relu)."""
    x = cc.as_input(x)
    mean, var = cc.as_input(mean, x.dtype), cc.as_input(var, x.dtype)
    c = x.shape[1]
    invstd = cc.empty((c,), x.dtype)
    _invstd_kernel[cc.blocks(c, THREADS), THREADS](var, float(eps), invstd)
    y = cc.empty(x.shape, x.dtype)
    xhat = cc.empty(x.shape, x.dtype)
    _forward_kernel[cc.blocks(x.size, THREADS), THREADS](
        _ncs(x), mean, invstd, *_optional(weight, x), *_optional(bias, x), bool(relu), _ncs(y), _ncs(xhat)
    )
    return y, xhat, invstd


@cuda.jit
def _grad_input_kernel(gy, xhat, relu_output, has_relu, invstd, weight, has_weight, gweight, gbias, training, gx):
    """Thread e: gx = w invstd (g - gbias/M - xhat gweight/M) if training, else w invstd g;
    g = gy, or 0 where the fused ReLU's output relu_output <= 0 (if has_relu)."""
    e = cuda.grid(1)
    n_img, n_c, n_s = gy.shape
    if e >= n_img * n_c * n_s:
        return
    n, c, s = cc.unravel3(e, n_c, n_s)
    scale = invstd[c] * weight[c] if has_weight else invstd[c]
    g = gy[n, c, s]
    if has_relu and not relu_output[n, c, s] > 0:
        g = gy.dtype.type(0)
    if training:
        m_total = gy.dtype.type(n_img * n_s)
        g = g - gbias[c] / m_total - xhat[n, c, s] * (gweight[c] / m_total)
    gx[n, c, s] = scale * g


def batch_norm_backward(gy, xhat, invstd, weight, training, relu_output=None):
    """(gx, gweight, gbias): the split channel sums, then one thread per element.

    relu_output: the fused forward's y; the gradient then flows only where y > 0.
    """
    gy = cc.as_input(gy)
    xhat, invstd = cc.as_input(xhat, gy.dtype), cc.as_input(invstd, gy.dtype)
    mask = None if relu_output is None else _ncs(cc.as_input(relu_output, gy.dtype))
    sums = cc.channel_sums(_ncs(gy), _ncs(xhat), mask)
    gbias, gweight = sums[0], sums[1]
    gx = cc.empty(gy.shape, gy.dtype)
    _grad_input_kernel[cc.blocks(gy.size, THREADS), THREADS](
        _ncs(gy), _ncs(xhat), _ncs(gy) if mask is None else mask, mask is not None,
        invstd, *_optional(weight, gy), gweight, gbias, bool(training), _ncs(gx)
    )
    return gx, gweight, gbias


def _signatures(template):
    """PTX signatures for float32 and float64; {A} is a C-contiguous (N, C, S) float array."""
    return cc.float_signatures(template, A="{t}[:, :, ::1]")


PTX_SIGNATURES = [
    (_stats_partials_kernel, _signatures("void({A}, int64, float64[:, :, ::1])")),
    (
        _stats_merge_kernel,
        _signatures("void(float64[:, :, ::1], float64, float64, float64, {t}[::1], boolean, {t}[::1], boolean, {t}[::1], {t}[::1])"),
    ),
    (_invstd_kernel, _signatures("void({t}[::1], float64, {t}[::1])")),
    (
        _forward_kernel,
        _signatures("void({A}, {t}[::1], {t}[::1], {t}[::1], boolean, {t}[::1], boolean, boolean, {A}, {A})"),
    ),
    (cc.channel_sums_kernel, cc.CHANNEL_SUMS_SIGNATURES),
    (cc.sum_splits_kernel, cc.SUM_SPLITS_SIGNATURES),
    (
        _grad_input_kernel,
        _signatures("void({A}, {A}, {A}, boolean, {t}[::1], {t}[::1], boolean, {t}[::1], {t}[::1], boolean, {A})"),
    ),
]
