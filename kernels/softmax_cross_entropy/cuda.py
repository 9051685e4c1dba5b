"""Softmax, log-softmax and the fused cross-entropy on the GPU (Numba CUDA).

Read ``reference.py`` first: it defines the ops and derives every gradient.

Layout. Softmax over ``dim`` of any tensor is a softmax over the middle axis of
the (outer, C, inner) view (outer = the dims before ``dim``, inner = the dims
after), which is free for a C-contiguous array. One thread per (outer, inner)
*row* loops over its C entries. Consecutive threads take consecutive inner
indices, so for every class c a warp reads 32 consecutive addresses: coalesced.
That is the segmentation case (softmax over channels of NCHW, inner = H*W).
For ``dim=-1`` (inner = 1) the threads' rows are C apart and the reads are not
coalesced; a block-per-row kernel would be the next version there.

* **softmax / log_softmax forward** -- two passes over the row instead of
  three: the first keeps a running maximum m and the sum of exp(x - m),
  rescaling the sum by exp(m_old - m_new) whenever the maximum grows ("online
  softmax"), so max and normaliser come from one read of the logits; the second
  writes the outputs. Every exponent stays <= 0, so logits of +-1000 stay finite.
* **backward** -- the same two passes: a dot product (``sum gy*y`` for softmax,
  ``sum gy`` for log-softmax), then the elementwise formula.
* **cross_entropy forward, fused** -- one thread per pixel reads each of its C
  logits exactly once and accumulates, in that single pass, the online
  log-sum-exp, the target logit, and the weighted sum ``S = sum_c w_c (x_c - m)``
  that label smoothing needs (kept relative to the running maximum, like the
  exponentials, and rescaled when it moves, so no large terms cancel). Then::

      -log p_t = lse - x_t,     sum_c w_c (-log p_c) = W (lse - m) - S,   W = sum_c w_c

  The per-pixel losses are written (they are the 'none' output) and, for 'mean'
  and 'sum', each block adds its pixels' losses and target weights ``w[t_i]``
  in shared memory (``cuda_common.block_sum``; blocks of 32 to 128 threads,
  ``cuda_common.reduce_threads``); a second one-block kernel adds the per-block
  partial sums and, for 'mean', divides. No pixel is visited on the host and
  no atomics are used, so the reduction is deterministic.
* **cross_entropy backward, fused** -- one thread per pixel reads its C logits
  once and writes its C gradients once (after summing the C class weights,
  which every thread reads from cache)::

      g_c = scale_i (A_i p_c - (1 - eps) w[t_i] [c == t_i] - (eps/C) w_c),   p_c = exp(x_c - lse_i)

  with A_i = (1 - eps) w[t_i] + (eps/C) W, and scale_i = gloss_i ('none'),
  gloss ('sum') or gloss / D ('mean', D = sum of w[t_i] over kept pixels, the
  same block reduction as the forward). Ignored pixels write 0.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from kernels import cuda_common as cc

__all__ = [
    "softmax_forward",
    "softmax_backward",
    "log_softmax_forward",
    "log_softmax_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
]

THREADS = 128  # block size (at most, for reductions: cuda_common.reduce_threads); shared buffers have this many slots


# ------------------------------------------------------------------- softmaxes


def _rows(a, dim):
    """``a`` as the (outer, C, inner) view whose middle axis is ``dim``."""
    outer = int(np.prod(a.shape[:dim], dtype=np.int64))
    return a.reshape(outer, a.shape[dim], -1)


@cuda.jit
def _softmax_forward_kernel(x, y, log):
    """Thread r handles row (o, k) = divmod(r, inner): online max/sum pass, then the write pass."""
    r = cuda.grid(1)
    outer, n_c, inner = x.shape
    if r >= outer * inner:
        return
    o = r // inner
    k = r % inner
    one = x.dtype.type(1)  # typed constants keep float32 rows in float32 arithmetic
    m = x[o, 0, k]
    total = one  # sum_c exp(x_c - m) for the classes seen so far
    for c in range(1, n_c):
        v = x[o, c, k]
        if v > m:
            total = total * math.exp(m - v) + one
            m = v
        else:
            total += math.exp(v - m)
    log_total = math.log(total)
    for c in range(n_c):
        z = x[o, c, k] - m
        y[o, c, k] = z - log_total if log else math.exp(z) / total


@cuda.jit
def _softmax_backward_kernel(y, gy, gx, log):
    """Thread r: the row's dot product, then gx = y (gy - dot) or gy - exp(y) sum(gy)."""
    r = cuda.grid(1)
    outer, n_c, inner = y.shape
    if r >= outer * inner:
        return
    o = r // inner
    k = r % inner
    dot = y.dtype.type(0)
    for c in range(n_c):
        dot += gy[o, c, k] if log else gy[o, c, k] * y[o, c, k]
    for c in range(n_c):
        v = y[o, c, k]
        gx[o, c, k] = gy[o, c, k] - math.exp(v) * dot if log else v * (gy[o, c, k] - dot)


def _softmax(x, dim, log):
    x = cc.as_input(x)
    y = cc.empty(x.shape, x.dtype)
    rows = _rows(x, dim)
    _softmax_forward_kernel[cc.blocks(rows.shape[0] * rows.shape[2], THREADS), THREADS](rows, _rows(y, dim), log)
    return y


def _softmax_grad(y, gy, dim, log):
    y, gy = cc.as_input(y), cc.as_input(gy)
    gx = cc.empty(y.shape, y.dtype)
    rows = _rows(y, dim)
    _softmax_backward_kernel[cc.blocks(rows.shape[0] * rows.shape[2], THREADS), THREADS](
        rows, _rows(gy, dim), _rows(gx, dim), log
    )
    return gx


def softmax_forward(x, dim):
    """p = exp(x - max) / sum exp(x - max) along ``dim``."""
    return _softmax(x, dim, False)


def softmax_backward(y, gy, dim):
    """gx = y * (gy - sum(gy * y, dim))."""
    return _softmax_grad(y, gy, dim, False)


def log_softmax_forward(x, dim):
    """log p = x - max - log sum exp(x - max) along ``dim``."""
    return _softmax(x, dim, True)


def log_softmax_backward(y, gy, dim):
    """gx = gy - exp(y) * sum(gy, dim)."""
    return _softmax_grad(y, gy, dim, True)


# --------------------------------------------------------------- cross-entropy


@cuda.jit
def _xent_forward_kernel(logits, target, weight, has_weight, ignore_index, eps, loss, lse, partials, reduce):
    """Thread = pixel (n, s): loss and lse in one pass over its logits; if ``reduce``, block b
    adds its pixels' (loss, w[t]) into partials[:, b]."""
    buf = cuda.shared.array(THREADS, dtype=float64)  # sums of many pixels: float64, as the cpu backend
    pix = cuda.grid(1)
    n_img, n_c, n_s = logits.shape
    zero = logits.dtype.type(0)
    loss_i = zero
    w_t = zero
    if pix < n_img * n_s:  # no early return: every thread must reach the block reductions
        n = pix // n_s
        s = pix % n_s
        t = target[n, s]
        one = logits.dtype.type(1)
        m = logits[n, 0, s]
        total = one  # sum_c exp(x_c - m)
        w_c = weight[0] if has_weight else one
        w_sum = w_c  # W over the classes seen so far
        wx = zero  # S = sum_c w_c (x_c - m); the c = 0 term is 0
        x_t = m
        for c in range(1, n_c):
            v = logits[n, c, s]
            w_c = weight[c] if has_weight else one
            if v > m:  # the maximum moves to v: rescale the sums kept relative to it
                total = total * math.exp(m - v) + one
                wx += (m - v) * w_sum
                m = v
            else:
                total += math.exp(v - m)
                wx += w_c * (v - m)
            w_sum += w_c
            if c == t:
                x_t = v
        log_total = math.log(total)
        lse[n, s] = m + log_total
        if t != ignore_index:
            w_t = weight[t] if has_weight else one
            smooth = eps / logits.dtype.type(n_c)
            loss_i = (one - eps) * w_t * (m + log_total - x_t) + smooth * (w_sum * log_total - wx)
        loss[n, s] = loss_i
    if reduce:  # the same value in every thread, so the whole block reaches the barriers
        loss_sum = cc.block_sum(loss_i, buf)
        w_t_sum = cc.block_sum(w_t, buf)
        if cuda.threadIdx.x == 0:
            partials[0, cuda.blockIdx.x] = loss_sum
            partials[1, cuda.blockIdx.x] = w_t_sum


@cuda.jit
def _target_weight_kernel(target, weight, has_weight, ignore_index, partials):
    """Block b adds w[t_i] over its kept pixels into partials[0, b] (D for 'mean' in backward)."""
    buf = cuda.shared.array(THREADS, dtype=float64)
    pix = cuda.grid(1)
    n_img, n_s = target.shape
    w_t = float64(0)
    if pix < n_img * n_s:
        t = target[pix // n_s, pix % n_s]
        if t != ignore_index:
            w_t = float64(weight[t]) if has_weight else float64(1)
    total = cc.block_sum(w_t, buf)
    if cuda.threadIdx.x == 0:
        partials[0, cuda.blockIdx.x] = total


@cuda.jit
def _sum_partials_kernel(partials, out, divide):
    """One block: out[q] = sum_b partials[q, b]; if ``divide``, out[0] = out[0] / out[1] ('mean')."""
    buf = cuda.shared.array(THREADS, dtype=float64)
    for q in range(partials.shape[0]):
        acc = float64(0)
        for b in range(cuda.threadIdx.x, partials.shape[1], cuda.blockDim.x):
            acc += partials[q, b]
        total = cc.block_sum(acc, buf)
        if cuda.threadIdx.x == 0:
            out[q] = total
    if divide and cuda.threadIdx.x == 0:
        out[0] = out[0] / out[1]  # 0/0 = NaN when every pixel is ignored, as torch


def _xent_inputs(logits, target, weight):
    """Device arrays and the (weight array, has_weight) pair: a 1-element dummy stands in for None."""
    logits = cc.as_input(logits)
    target = cc.as_input(target, np.int64)
    if weight is None:
        return logits, target, cc.zeros((1,), logits.dtype), False
    return logits, target, cc.as_input(weight, logits.dtype), True


def cross_entropy_forward(logits, target, weight, ignore_index, reduction, label_smoothing):
    """(loss, lse): the fused forward, then the two-stage reduction for 'mean' / 'sum'."""
    logits, target, weight, has_weight = _xent_inputs(logits, target, weight)
    n, _, s = logits.shape
    loss = cc.empty((n, s), logits.dtype)
    lse = cc.empty((n, s), logits.dtype)
    threads = cc.reduce_threads(n * s, THREADS)
    grid = cc.blocks(n * s, threads)
    reduce = reduction != "none"
    partials = cc.empty((2, grid if reduce else 1), np.float64)
    eps = logits.dtype.type(label_smoothing)
    _xent_forward_kernel[grid, threads](
        logits, target, weight, has_weight, ignore_index, eps, loss, lse, partials, reduce
    )
    if not reduce:
        return loss, lse
    out = cc.empty((2,), logits.dtype)
    _sum_partials_kernel[1, cc.reduce_threads(grid, THREADS)](partials, out, reduction == "mean")
    return out[0:1].reshape(()), lse


@cuda.jit
def _xent_backward_kernel(logits, target, weight, has_weight, ignore_index, eps, lse, gscale, denom, glogits):
    """Thread = pixel (n, s): glogits[n, :, s] from its logits and lse (module docstring).

    ``gscale`` holds gloss per pixel ('none') or one value; ``denom[0]`` is D for 'mean', else 1.
    """
    pix = cuda.grid(1)
    n_img, n_c, n_s = logits.shape
    if pix >= n_img * n_s:
        return
    n = pix // n_s
    s = pix % n_s
    t = target[n, s]
    zero = logits.dtype.type(0)
    if t == ignore_index:
        for c in range(n_c):
            glogits[n, c, s] = zero
        return
    one = logits.dtype.type(1)
    w_sum = zero
    for c in range(n_c):
        w_sum += weight[c] if has_weight else one
    w_t = weight[t] if has_weight else one
    scale = gscale[pix % gscale.size] / denom[0]  # gscale.size is 1 unless reduction is 'none'
    smooth = eps / logits.dtype.type(n_c)
    a = (one - eps) * w_t + smooth * w_sum
    for c in range(n_c):
        g = a * math.exp(logits[n, c, s] - lse[n, s]) - smooth * (weight[c] if has_weight else one)
        if c == t:
            g -= (one - eps) * w_t
        glogits[n, c, s] = scale * g


def cross_entropy_backward(logits, target, weight, ignore_index, reduction, label_smoothing, lse, gloss):
    """glogits (N, C, S); for 'mean' first D = sum of w[t_i] over kept pixels (block reduction)."""
    logits, target, weight, has_weight = _xent_inputs(logits, target, weight)
    lse = cc.as_input(lse, logits.dtype)
    gscale = cc.as_input(gloss, logits.dtype).reshape(-1)
    n, _, s = logits.shape
    threads = cc.reduce_threads(n * s, THREADS)
    grid = cc.blocks(n * s, threads)
    if reduction == "mean":
        partials = cc.empty((1, grid), np.float64)
        _target_weight_kernel[grid, threads](target, weight, has_weight, ignore_index, partials)
        denom = cc.empty((1,), logits.dtype)
        _sum_partials_kernel[1, cc.reduce_threads(grid, THREADS)](partials, denom, False)
    else:
        denom = cc.xp.ones((1,), logits.dtype)
    glogits = cc.empty(logits.shape, logits.dtype)
    eps = logits.dtype.type(label_smoothing)
    _xent_backward_kernel[grid, threads](
        logits, target, weight, has_weight, ignore_index, eps, lse, gscale, denom, glogits
    )
    return glogits


# ------------------------------------------------------------ PTX compile targets


_signatures = cc.float_signatures  # {t}: the float type


_L = "{t}[:, :, ::1]"  # a C-contiguous (outer|N, C, inner|S) array
_P = "{t}[:, ::1]"  # (N, S) per-pixel maps
_S = "float64[:, ::1]"  # (quantities, blocks) partial sums
PTX_SIGNATURES = [
    (_softmax_forward_kernel, _signatures(f"void({_L}, {_L}, boolean)")),
    (_softmax_backward_kernel, _signatures(f"void({_L}, {_L}, {_L}, boolean)")),
    (
        _xent_forward_kernel,
        _signatures(f"void({_L}, int64[:, ::1], {{t}}[::1], boolean, int64, {{t}}, {_P}, {_P}, {_S}, boolean)"),
    ),
    (_target_weight_kernel, _signatures(f"void(int64[:, ::1], {{t}}[::1], boolean, int64, {_S})")),
    (_sum_partials_kernel, _signatures(f"void({_S}, {{t}}[::1], boolean)")),
    (
        _xent_backward_kernel,
        _signatures(f"void({_L}, int64[:, ::1], {{t}}[::1], boolean, int64, {{t}}, {_P}, {{t}}[::1], {{t}}[::1], {_L})"),
    ),
]
