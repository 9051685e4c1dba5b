"""Softmax, log-softmax and the fused pixel-wise cross-entropy on the CPU (Numba).

Read ``reference.py`` first for the math. The optimisations, in the order they
matter:

1. **Pixel blocks, classes outer.** An (N, C, H, W) map is seen as
   (outer, C, inner): for a pixel the C values sit ``inner`` apart, but for one
   class a row of pixels is contiguous. A parallel job takes one outer index and
   a block of ``BLOCK`` pixels and runs every reduction over the classes as
   ``for c: for s in block: acc[s] += ...``: the inner loop walks contiguous
   memory with no dependence between iterations, which LLVM vectorises. The
   per-pixel running max / sum live in small block buffers that stay in L1.
2. **A vectorisable exp and log** (``fastmath.py``). Numba's ``math.exp`` is
   a scalar libm call, which blocks vectorisation. ``fastmath.fast_exp``
   computes exp(z) with the textbook range reduction z = k ln2 + r,
   |r| <= ln2/2: e^r by a Taylor polynomial and 2^k written straight into the
   exponent bits; ``fastmath.fast_log`` reads exponent and mantissa from the
   bits. Plain arithmetic, so the loops that call them vectorise;
   ``tests/kernels/test_fastmath.py`` measures the accuracy against NumPy.
3. **Fused cross-entropy: the targets, then one pass over the logits.** D =
   sum of w[t_i] over the kept pixels depends on the targets alone, so a first
   parallel pass sums it (and counts targets out of range) before the logits
   are read; for 'mean' the gradient can then be written already divided by D.
   Per pixel block: a pass for the max over classes, a gather of the target's
   logit and weight, then one pass per class that computes e_c = exp(x_c - m)
   -- straight into the gradient's memory when a gradient is wanted -- and
   accumulates sum_c e_c and, with smoothing, sum_c w_c (m - x_c). The
   gradient scale A_i (p_c - q_c) is then finished in place from e_c (still
   in cache; the logits are not read again), and the losses and per-job
   partial sums follow per pixel. The backward multiplies by gloss: nothing
   to do when gloss is 1 (``loss.backward()`` on 'mean' or 'sum'), so it
   returns the forward's array; otherwise one scaling pass. Without a
   gradient (inference, ``need_grad=False``) nothing of size (N, C, S) is
   written. Partial sums are float64 and combined in job order, so results
   are deterministic.
4. **Small helpers for the hot loops.** Inside one big parallel kernel, a loop
   that touches many arrays stays scalar: LLVM cannot prove the arrays do not
   overlap. The cross-entropy's per-block loops are therefore small compiled
   functions on a few 1-D blocks, which LLVM vectorises behind a runtime
   overlap check; its per-block buffers come from one allocation per job.
   (A loop over pixels with the classes unrolled inside it, all of a pixel in
   registers, stays scalar for the same reason: its C stores and C loads
   need more overlap checks than LLVM will emit.) Timings: ``python -m
   benchmarks ops --only cross_entropy`` (against torch's whole call,
   forward + backward).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.softmax_cross_entropy.fastmath import JIT_OPTIONS, exp_shifted, log_inplace

__all__ = [
    "softmax_forward",
    "softmax_backward",
    "log_softmax_forward",
    "log_softmax_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
]

BLOCK = 512  # pixels per job: 2 KiB float32 per buffer, a few buffers fit L1

_BLOCK_OPTIONS = dict(JIT_OPTIONS, cache=True)  # JIT_OPTIONS: see fastmath.py
_KERNEL_OPTIONS = dict(_BLOCK_OPTIONS, parallel=True)


def _split(x, dim):
    """View x as (outer, C, inner) around ``dim``."""
    outer = int(np.prod(x.shape[:dim], dtype=np.int64))
    return x.reshape(outer, x.shape[dim], -1)


@njit(inline="always")
def _block(job, n_blocks, inner):
    """Job -> (outer index, first pixel, one past the last pixel)."""
    o = job // n_blocks
    s0 = (job % n_blocks) * BLOCK
    return o, s0, min(s0 + BLOCK, inner)


@njit(inline="always")
def _max_over_classes(x, o, s0, s1, m):
    """m[s - s0] = max_c x[o, c, s]; a NaN logit makes the maximum NaN (as np.max and torch)."""
    m[:] = x[o, 0, s0:s1]
    for c in range(1, x.shape[1]):
        for s in range(s0, s1):
            v = x[o, c, s]
            # not max(): Numba's max(a, nan) returns a, which would hide a NaN in class c >= 1
            m[s - s0] = v if (v > m[s - s0] or v != v) else m[s - s0]


@njit(**_BLOCK_OPTIONS)
def _softmax_row(x, m, acc, log, out):
    """out = exp(x - m) / acc, or (x - m) - acc for log-softmax (acc then holds log sum exp)."""
    for k in range(out.size):
        out[k] = (x[k] - m[k]) - acc[k] if log else out[k] / acc[k]


@njit(**_KERNEL_OPTIONS)
def _softmax_kernel(x, y, log):
    """y = softmax(x) along axis 1 (or log-softmax when ``log``)."""
    outer, n_cls, inner = x.shape
    n_blocks = (inner + BLOCK - 1) // BLOCK
    for job in prange(outer * n_blocks):
        o, s0, s1 = _block(job, n_blocks, inner)
        m = np.empty(s1 - s0, x.dtype)
        acc = np.zeros(s1 - s0, x.dtype)
        _max_over_classes(x, o, s0, s1, m)
        for c in range(n_cls):
            out = y[o, c, s0:s1]
            exp_shifted(x[o, c, s0:s1], m, out)  # exp(x - m); overwritten for log-softmax
            acc += out
        if log:
            # (x - m) - log acc, not x - (m + log acc): m + log acc would round at m's magnitude
            log_inplace(acc)
        for c in range(n_cls):
            _softmax_row(x[o, c, s0:s1], m, acc, log, y[o, c, s0:s1])


@njit(**_BLOCK_OPTIONS)
def _softmax_grad_row(y, gy, dot, log, gx):
    """softmax: gx = y (gy - dot); log-softmax: gx = gy - exp(y) dot, with exp(y) in gx on entry."""
    for k in range(gx.size):
        gx[k] = gy[k] - gx[k] * dot[k] if log else y[k] * (gy[k] - dot[k])


@njit(**_KERNEL_OPTIONS)
def _softmax_backward_kernel(y, gy, gx, log):
    """softmax: gx = y (gy - sum_c gy y);  log-softmax: gx = gy - exp(y) sum_c gy."""
    outer, n_cls, inner = y.shape
    n_blocks = (inner + BLOCK - 1) // BLOCK
    for job in prange(outer * n_blocks):
        o, s0, s1 = _block(job, n_blocks, inner)
        dot = np.zeros(s1 - s0, y.dtype)
        zero = np.zeros(s1 - s0, y.dtype)
        for c in range(n_cls):
            if log:
                dot += gy[o, c, s0:s1]
            else:
                dot += gy[o, c, s0:s1] * y[o, c, s0:s1]
        for c in range(n_cls):
            if log:
                exp_shifted(y[o, c, s0:s1], zero, gx[o, c, s0:s1])
            _softmax_grad_row(y[o, c, s0:s1], gy[o, c, s0:s1], dot, log, gx[o, c, s0:s1])


def _softmax(x, dim, log):
    y = np.empty_like(x)
    _softmax_kernel(_split(x, dim), _split(y, dim), log)
    return y


def _softmax_backward(y, gy, dim, log):
    gx = np.empty_like(gy)
    _softmax_backward_kernel(_split(y, dim), _split(gy, dim), _split(gx, dim), log)
    return gx


def softmax_forward(x, dim):
    """y = exp(x - max) / sum exp(x - max) along ``dim``."""
    return _softmax(x, dim, False)


def softmax_backward(y, gy, dim):
    """gx = y * (gy - sum(gy * y, dim))."""
    return _softmax_backward(y, gy, dim, False)


def log_softmax_forward(x, dim):
    """y = x - max - log sum exp(x - max) along ``dim``."""
    return _softmax(x, dim, True)


def log_softmax_backward(y, gy, dim):
    """gx = gy - exp(y) * sum(gy, dim)."""
    return _softmax_backward(y, gy, dim, True)


# ------------------------------------------------------------------ cross-entropy


# Per-block helpers of the cross-entropy: small compiled functions on a few 1-D
# contiguous blocks. Written inline in the big kernels, these loops touch so many
# arrays that LLVM cannot prove they do not overlap and leaves them scalar (~3x slower).


@njit(**_BLOCK_OPTIONS)
def _kept_targets(tb, ignore_index, n_cls, tk):
    """tk = the target where the pixel is kept, else -1, as int32.

    A pixel is kept when its target is not ignore_index (which may lie inside
    [0, C)) and lies in [0, C). The per-class loops then test ``tk == c`` and
    ``tk >= 0`` on int32, as wide as the float32 lanes they select between.
    """
    for k in range(tk.size):
        kept = (tb[k] != ignore_index) & (tb[k] >= 0) & (tb[k] < n_cls)
        tk[k] = tb[k] if kept else -1


@njit(**_BLOCK_OPTIONS)
def _pick_target(x, i, s0, tk, w, xt, wt):
    """xt = x[i, t, s] (the target's logit), wt = w[t], 0 where not kept: a gather per pixel
    (class 0 where not kept, so every read stays in range)."""
    zero = xt.dtype.type(0)
    for k in range(xt.size):
        c = max(tk[k], 0)
        xt[k] = x[i, c, s0 + k]
        wt[k] = w[c] if tk[k] >= 0 else zero


@njit(**_BLOCK_OPTIONS)
def _smoothing_term(wc, m, xc, wz):
    """wz += w_c (m - x_c): the smoothing's sum_c w_c (m - x_c), one class at a time."""
    for k in range(wz.size):
        wz[k] += wc * (m[k] - xc[k])


@njit(**_BLOCK_OPTIONS)
def _pixel_losses(tk, eps, smooth, w_sum, m, log_acc, xt, wt, wz, loss):
    """loss = (1-eps) w_t (-log p_t) + (eps/C) sum_c w_c (-log p_c), 0 where not kept; returns their sum (float64).

    -log p_c = (m - x_c) + log acc, so sum_c w_c (-log p_c) = W log acc + wz with
    wz = sum_c w_c (m - x_c). Kept pixels have tk >= 0 (``_kept_targets``).
    """
    total = 0.0
    for k in range(m.size):
        kept = tk[k] >= 0
        value = (1 - eps) * wt[k] * ((m[k] - xt[k]) + log_acc[k]) + smooth * (w_sum * log_acc[k] + wz[k])
        value = value if kept else 0.0
        loss[k] = value
        total += value
    return total


@njit(**_BLOCK_OPTIONS)
def _gradient_coefficients(tk, eps, smooth, w_sum, scale, wt, acc, a, b, sc):
    """Per pixel, for g_c = scale (a' e_c - (b' where c == t) - sc' w_c) with e_c = exp(x_c - m):
    a' = A / acc (p_c = e_c / acc), b' = (1-eps) w_t, sc' = eps/C. a, b, sc hold them times
    ``scale``, and 0 where not kept (those pixels get exactly 0, whatever the scale). w_t comes
    from ``wt`` (picked per class by _pick_target): a gather w[t] here would keep the loop scalar."""
    zero = a.dtype.type(0)
    for k in range(a.size):
        kept = tk[k] >= 0
        b_k = (1 - eps) * wt[k]
        a_k = (b_k + smooth * w_sum) / acc[k]
        a[k] = a_k * scale if kept else zero
        b[k] = b_k * scale if kept else zero
        sc[k] = smooth * scale if kept else zero


@njit(**_BLOCK_OPTIONS)
def _class_gradient(tk, c, wc, a, b, sc, out):
    """out = a e - (b where tk == c) - sc w_c, with out = e = exp(x_c - m) on entry."""
    zero = out.dtype.type(0)
    for k in range(out.size):
        bk = b[k] if tk[k] == c else zero
        out[k] = a[k] * out[k] - bk - sc[k] * wc


@njit(**_BLOCK_OPTIONS)
def _target_sums(tb, w, ignore_index, n_cls):
    """(sum of w[t] over the kept pixels of the block, number of targets outside [0, C) that are not ignore_index)."""
    weight_total = 0.0
    invalid = 0.0
    for k in range(tb.size):
        tk = tb[k]
        in_range = (tk >= 0) & (tk < n_cls)
        kept = in_range & (tk != ignore_index)
        w_t = w[tk if kept else 0]  # a load from a valid index, then a select: no branch, so it vectorises
        weight_total += w_t if kept else 0.0
        invalid += 0.0 if (in_range | (tk == ignore_index)) else 1.0
    return weight_total, invalid


@njit(**_KERNEL_OPTIONS)
def _target_kernel(t, w, ignore_index, n_cls, partial):
    """Per job: ``_target_sums`` of its block into ``partial`` -- from the targets alone, before the logits."""
    n, n_pix = t.shape
    n_blocks = (n_pix + BLOCK - 1) // BLOCK
    for job in prange(n * n_blocks):
        i, s0, s1 = _block(job, n_blocks, n_pix)
        partial[job] = _target_sums(t[i, s0:s1], w, ignore_index, n_cls)


@njit(**_KERNEL_OPTIONS)
def _ce_forward_kernel(x, t, w, ignore_index, eps, scale, need_grad, loss, grad, partial):
    """The per-pixel loss (0 where not kept), the gradient times ``scale`` (when ``need_grad``)
    and per-job sums of the losses in ``partial``: one pass over the logits."""
    n, n_cls, n_pix = x.shape
    n_blocks = (n_pix + BLOCK - 1) // BLOCK
    w_sum = w.sum()
    smooth = eps / n_cls
    for job in prange(n * n_blocks):
        i, s0, s1 = _block(job, n_blocks, n_pix)
        size = s1 - s0
        tk = np.empty(size, np.int32)
        _kept_targets(t[i, s0:s1], ignore_index, n_cls, tk)
        # one allocation per job for all nine per-pixel buffers, not nine (each is a call into the allocator)
        buf = np.empty((9, size), x.dtype)
        m, acc, e, xt, wt, wz, a, b, sc = buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8]
        acc[:] = 0  # sum_c exp(x_c - m), then its log
        wz[:] = 0  # sum_c w_c (m - x_c), for the smoothing term
        _max_over_classes(x, i, s0, s1, m)
        _pick_target(x, i, s0, tk, w, xt, wt)
        for c in range(n_cls):
            xc = x[i, c, s0:s1]
            ec = grad[i, c, s0:s1] if need_grad else e  # the gradient's own memory holds e_c until it is written
            exp_shifted(xc, m, ec)
            acc += ec
            if eps > 0:
                _smoothing_term(w[c], m, xc, wz)
        if need_grad:  # grad[:, c] = scale (A p_c - ...), from e_c still in L1/L2 (the logits are not read again)
            _gradient_coefficients(tk, eps, smooth, w_sum, scale, wt, acc, a, b, sc)
            for c in range(n_cls):
                _class_gradient(tk, c, w[c], a, b, sc, grad[i, c, s0:s1])
        log_inplace(acc)
        partial[job] = _pixel_losses(tk, eps, smooth, w_sum, m, acc, xt, wt, wz, loss[i, s0:s1])



@njit(**_BLOCK_OPTIONS)
def _scale_row(d, scale, out):
    """out = d * scale, except that a zero of d stays 0 (whatever the scale: inf or NaN included)."""
    zero = out.dtype.type(0)
    for k in range(out.size):
        out[k] = d[k] * scale[k] if d[k] != 0 else zero


@njit(**_KERNEL_OPTIONS)
def _ce_backward_kernel(d, gmap, per_pixel, gscalar, g):
    """g = d * scale_i: scale_i = gmap[i, s] when ``per_pixel`` ('none') else ``gscalar``."""
    n, n_cls, n_pix = d.shape
    n_blocks = (n_pix + BLOCK - 1) // BLOCK
    for job in prange(n * n_blocks):
        i, s0, s1 = _block(job, n_blocks, n_pix)
        scale = gmap[i, s0:s1] if per_pixel else np.full(s1 - s0, gscalar, d.dtype)
        for c in range(n_cls):
            _scale_row(d[i, c, s0:s1], scale, g[i, c, s0:s1])


@njit(cache=True, error_model="numpy")  # its two kernels run their own parallel loops; no fastmath: sums in job order
def _ce_forward(x, t, w, ignore_index, eps, mean, need_grad, loss, grad, target_partial, partial, totals, reduced):
    """The whole forward in one compiled call: ``_target_kernel``, D and the scale, ``_ce_forward_kernel``,
    and the reduced loss. totals = (D = sum of w[t] over kept pixels, targets out of range, the sum of
    the pixel losses -- divided by D for 'mean': 0/0 = NaN where every pixel is ignored, as torch);
    reduced[0] = totals[2] in the logits' dtype. Every result is written here, none computed after
    the call, so a replayed step (``minseg/capture.py``) gets all of them new."""
    _target_kernel(t, w, ignore_index, x.shape[1], target_partial)
    weight_total, invalid = 0.0, 0.0
    for j in range(target_partial.shape[0]):
        weight_total += target_partial[j, 0]
        invalid += target_partial[j, 1]
    # D = 0 (no pixel kept): an infinite scale, which multiplies nothing (every gradient row is 0 there)
    scale = 1.0 / weight_total if mean else 1.0
    _ce_forward_kernel(x, t, w, ignore_index, eps, scale, need_grad, loss, grad, partial)
    total = 0.0
    for j in range(partial.size):
        total += partial[j]
    totals[0], totals[1], totals[2] = weight_total, invalid, total / weight_total if mean else total
    reduced[0] = totals[2]


def cross_entropy_forward(logits, target, weight, ignore_index, reduction, label_smoothing, need_grad):
    """(loss, dlogits, denom, n_invalid) as the reference: a pass over the targets for D (so that
    'mean' writes its gradient already divided by D), then one fused pass over the logits, both in
    one compiled call (``_ce_forward``) that also reduces the loss: no NumPy work after it."""
    n, n_cls, n_pix = logits.shape
    w = np.ones(n_cls, logits.dtype) if weight is None else weight
    jobs = n * ((n_pix + BLOCK - 1) // BLOCK)
    loss = np.empty((n, n_pix), logits.dtype)
    grad = np.empty_like(logits) if need_grad else np.empty((1, 1, 1), logits.dtype)
    totals, reduced = np.empty(3), np.empty(1, logits.dtype)
    _ce_forward(logits, target, w, ignore_index, label_smoothing, reduction == "mean", need_grad, loss, grad,
                np.empty((jobs, 2)), np.empty(jobs), totals, reduced)
    if reduction != "none":
        loss = reduced.reshape(())
    # 0-d views of what the call wrote (the count of bad targets as a float64 holding an integer)
    return loss, grad if need_grad else None, totals[0:1].reshape(()), totals[1:2].reshape(())


def cross_entropy_backward(dlogits, gloss, reduction):
    """glogits = dlogits * gloss_i ('none') or dlogits * gloss, one scaling pass -- or none:
    when gloss is the scalar 1 (``loss.backward()`` on a reduced loss) ``dlogits`` itself is returned."""
    per_pixel = reduction == "none"
    if not per_pixel and gloss == 1:
        return dlogits
    gmap = gloss if per_pixel else np.zeros((1, 1), dlogits.dtype)
    g = np.empty_like(dlogits)
    _ce_backward_kernel(dlogits, gmap, per_pixel, 0.0 if per_pixel else float(gloss), g)
    return g
