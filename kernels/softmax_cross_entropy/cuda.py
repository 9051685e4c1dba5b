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
* **cross_entropy v2: forward and backward fused into one pass.** The
  kernel is built per number of classes C (``_xent_kernel(C)``, cached): C is
  a compile-time constant, so a pixel's C logits fit a fixed-size local array
  (registers when C is small -- ``python -m benchmarks.ptx_report`` shows the
  registers and spills of C = 4 and 19; a large C spills to local memory, cached in
  L1), and the loops over classes have constant trip counts the compiler
  unrolls. Each thread takes PIXELS pixels, a block's threads taking
  consecutive pixels for each of them (a warp reads 32 consecutive addresses
  of one class: coalesced), and for each pixel:

  1. loads all C logits before using any (C independent loads in flight);
  2. m = max, e_c = exp(x_c - m), sum_c e_c, the target logit and
     ``S = sum_c w_c (x_c - m)`` from registers; then::

       -log p_t = log sum e - (x_t - m),   sum_c w_c (-log p_c) = W log sum e - S

  3. writes the loss (for 'none') and, when a gradient is wanted, the unscaled
     gradient ``A_i p_c - (1 - eps) w[t_i] [c == t_i] - (eps/C) w_c`` with
     p_c = e_c / sum e (0 at ignored pixels): the logits are read once, the
     gradient written once, and no log-sum-exp is saved for a second pass.
  4. checks the target on the device: a target outside [0, C) that is not
     ignore_index is counted (its pixel treated as ignored), so the caller can
     raise after reading one number instead of copying the targets to the host.

  Each block adds its (loss, w[t_i], invalid count) with warp shuffles
  (``cuda_common.block_total``, float64) into partials[:, 0, block], and
  ``cuda_common.sum_partials`` adds the blocks in a fixed order
  (deterministic, no atomics). dlogits is the gradient of the *reduced* loss
  (kernels/README.md): for 'mean' that is the fused pass's gradient divided by
  D, which is only known once every block has added its partials, so the
  forward scales it in place by 1/D with ``_scale_kernel`` (one more
  elementwise pass; the CPU backend instead sums D from the targets before its
  fused pass, which a GPU could do too -- not done yet). The backward is one
  elementwise pass: ``glogits = dlogits * gloss_i`` ('none') or ``* gloss``; a
  zero of dlogits stays 0, so ignored pixels get exactly 0 even when D = 0.
  (It runs even when gloss is 1: seeing that would cost a read back to the host.)

  v2 replaced v1 (the interface changed with it, see kernels/README.md). v1's
  forward saved the log-sum-exp and its backward re-read the logits, recomputed
  every exp and ran a second reduction for D. Memory traffic of a training
  step, in passes over an (N, C, S) array: v1 3 (read logits; read them again,
  write the gradient), v2 4 (read logits, write dlogits; read dlogits, write
  the gradient) -- v2 computes each exp once, needs no second reduction, and
  checks the targets on the device (before it, ``functional.cross_entropy``
  copied every target to the host on each call), but moves one pass more
  ('mean' adds two: the in-place 1/D scaling above). On a memory-bound GPU
  those passes are a cost; no GPU has timed either yet.
"""
from __future__ import annotations

import functools
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

THREADS = 128  # block size (at most, for the cross-entropy: a multiple of the warp, see _xent_threads)


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

PIXELS = 4  # pixels per thread


@functools.lru_cache(maxsize=None)
def _xent_kernel(n_classes: int):
    """The fused cross-entropy kernel for C = n_classes (a compile-time constant), built once per C."""
    n_c = n_classes
    warp = cc.WARP  # a closure int is a compile-time constant (an attribute of another module is not)

    def xent_kernel(logits, target, weight, ignore_index, eps, need_grad, write_loss, loss, grad, partials):
        """Thread t of block b: pixels b*T*PIXELS + k*T + t (k < PIXELS) -- loss, unscaled gradient (before 'mean' divides it by D),
        and the block's (sum loss, sum w[t], invalid targets) in partials[:, 0, b]."""
        slots = cuda.shared.array(warp, dtype=float64)
        xs = cuda.local.array(n_c, dtype=logits.dtype)
        n_img, _, n_s = logits.shape
        one = logits.dtype.type(1)
        w_sum = logits.dtype.type(0)  # W = sum_c w_c
        for c in range(n_c):
            w_sum += weight[c]
        smooth = eps / logits.dtype.type(n_c)
        loss_acc = float64(0)
        weight_acc = float64(0)
        invalid = float64(0)
        first = cuda.blockIdx.x * cuda.blockDim.x * PIXELS + cuda.threadIdx.x
        for k in range(PIXELS):  # no early return: every thread must reach the block reductions
            pix = first + k * cuda.blockDim.x
            if pix < n_img * n_s:
                n = pix // n_s
                s = pix % n_s
                t = target[n, s]
                for c in range(n_c):  # every load first
                    xs[c] = logits[n, c, s]
                m = xs[0]
                for c in range(1, n_c):
                    m = xs[c] if xs[c] > m else m  # a NaN logit is never the max; it makes its exp NaN below
                total = logits.dtype.type(0)  # sum_c e_c
                wx = logits.dtype.type(0)  # S = sum_c w_c (x_c - m)
                z_t = logits.dtype.type(0)  # x_t - m
                for c in range(n_c):
                    z = xs[c] - m
                    wx += weight[c] * z
                    if c == t:
                        z_t = z
                    xs[c] = math.exp(z)
                    total += xs[c]
                kept = t != ignore_index and 0 <= t < n_c
                if t != ignore_index and not kept:
                    invalid += 1
                w_t = weight[t] if kept else logits.dtype.type(0)
                log_total = math.log(total)
                loss_i = logits.dtype.type(0)
                if kept:
                    loss_i = (one - eps) * w_t * (log_total - z_t) + smooth * (w_sum * log_total - wx)
                if write_loss:
                    loss[n, s] = loss_i
                if need_grad:
                    on = one if kept else logits.dtype.type(0)
                    b_t = on * (one - eps) * w_t
                    a = on * (b_t + smooth * w_sum) / total
                    for c in range(n_c):
                        g = a * xs[c] - on * smooth * weight[c]
                        grad[n, c, s] = g - b_t if c == t else g
                loss_acc += loss_i
                weight_acc += w_t
        loss_acc = cc.block_total(loss_acc, slots)
        weight_acc = cc.block_total(weight_acc, slots)
        invalid = cc.block_total(invalid, slots)
        if cuda.threadIdx.x == 0:
            partials[0, 0, cuda.blockIdx.x] = loss_acc
            partials[1, 0, cuda.blockIdx.x] = weight_acc
            partials[2, 0, cuda.blockIdx.x] = invalid

    xent_kernel.__name__ = xent_kernel.__qualname__ = f"xent_kernel_c{n_c}"  # tells ptx_report's rows apart
    return cuda.jit(xent_kernel)


def _xent_threads(pixels: int) -> int:
    """Block size: a multiple of the warp, at most THREADS, no larger than the pixels need (one warp under the simulator)."""
    if cc.SIMULATOR:
        return cc.WARP
    return min(THREADS, cc.WARP * cc.blocks(cc.blocks(pixels, PIXELS), cc.WARP))


def cross_entropy_forward(logits, target, weight, ignore_index, reduction, label_smoothing, need_grad):
    """(loss, dlogits, denom, n_invalid): one fused pass, then the fixed-order sum of the blocks' partials."""
    logits = cc.as_input(logits)
    target = cc.as_input(target, np.int64)
    n, c, s = logits.shape
    weight = cc.xp.ones((c,), logits.dtype) if weight is None else cc.as_input(weight, logits.dtype)
    threads = _xent_threads(n * s)
    grid = cc.blocks(n * s, threads * PIXELS)
    partials = cc.empty((3, 1, grid), np.float64)
    per_pixel = reduction == "none"
    loss = cc.empty((n, s) if per_pixel else (1, 1), logits.dtype)
    grad = cc.empty(logits.shape if need_grad else (1, 1, 1), logits.dtype)
    _xent_kernel(c)[grid, threads](
        logits, target, weight, ignore_index, logits.dtype.type(label_smoothing), need_grad, per_pixel, loss, grad, partials
    )
    totals = cc.sum_partials(partials, np.float64)  # rows: sum of losses, D, invalid targets (on the device)
    if need_grad and reduction == "mean":
        with np.errstate(divide="ignore"):  # D = 0: every dlogits is 0 and stays 0
            inverse = (1.0 / totals[1]).astype(logits.dtype).reshape(1, 1)
        _scale_kernel[cc.blocks(grad.size, THREADS), THREADS](grad, inverse, False, grad)  # in place
    if not per_pixel:
        total = totals[0]
        if reduction == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 = NaN when all are ignored, as torch
                total = total / totals[1]
        loss = total.astype(logits.dtype).reshape(())
    return loss, grad if need_grad else None, totals[1].reshape(()), totals[2].reshape(())


@cuda.jit
def _scale_kernel(dlogits, scale, per_pixel, glogits):
    """Thread e: glogits.flat[e] = dlogits.flat[e] * scale (0 where dlogits is 0); scale = scale[n, s]
    when ``per_pixel``, else scale[0, 0]. glogits may be dlogits itself (each thread reads, then writes its own element)."""
    e = cuda.grid(1)
    n_img, n_c, n_s = dlogits.shape
    if e >= n_img * n_c * n_s:
        return
    n, c, s = cc.unravel3(e, n_c, n_s)
    d = dlogits[n, c, s]
    g = dlogits.dtype.type(0)
    if d != 0:  # ignored pixels stay exactly 0, even when the scale is inf (D = 0) or NaN
        g = d * (scale[n, s] if per_pixel else scale[0, 0])
    glogits[n, c, s] = g


def cross_entropy_backward(dlogits, gloss, reduction):
    """glogits = dlogits * gloss_i ('none') or dlogits * gloss, one elementwise pass (a zero of dlogits stays 0)."""
    dlogits = cc.as_input(dlogits)
    per_pixel = reduction == "none"
    gloss = cc.as_input(gloss, dlogits.dtype).reshape((dlogits.shape[0], dlogits.shape[2]) if per_pixel else (1, 1))
    glogits = cc.empty(dlogits.shape, dlogits.dtype)
    _scale_kernel[cc.blocks(dlogits.size, THREADS), THREADS](dlogits, gloss, per_pixel, glogits)
    return glogits


# ------------------------------------------------------------ PTX compile targets


_signatures = cc.float_signatures  # {t}: the float type


_L = "{t}[:, :, ::1]"  # a C-contiguous (outer|N, C, inner|S) array
_P = "{t}[:, ::1]"  # (N, S) per-pixel maps
_XENT = f"void({_L}, int64[:, ::1], {{t}}[::1], int64, {{t}}, boolean, boolean, {_P}, {_L}, float64[:, :, ::1])"
_PTX_CLASSES = (4, 19)  # the benchmark's class counts (issue 8): each C is its own kernel
PTX_SIGNATURES = [
    (_softmax_forward_kernel, _signatures(f"void({_L}, {_L}, boolean)")),
    (_softmax_backward_kernel, _signatures(f"void({_L}, {_L}, {_L}, boolean)")),
    *[(_xent_kernel(c), _signatures(_XENT)) for c in _PTX_CLASSES],
    (_scale_kernel, _signatures(f"void({_L}, {_P}, boolean, {_L})")),
    (cc.sum_splits_kernel, cc.SUM_SPLITS_SIGNATURES),
]
