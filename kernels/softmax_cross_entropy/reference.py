"""Softmax, log-softmax and the pixel-wise cross-entropy: the NumPy definition.

Softmax turns a vector of logits z (the C class scores of one pixel) into
probabilities::

    p_c = exp(z_c) / sum_k exp(z_k) = exp(z_c - m) / sum_k exp(z_k - m),   m = max_k z_k

Subtracting the maximum changes nothing mathematically (it cancels) but keeps
every exponent <= 0, so exp never overflows, and the largest term is exactly 1,
so the sum never underflows to 0: logits of +-1000 stay finite. The log of the
sum is the *log-sum-exp* ``lse = m + log sum_k exp(z_k - m)``, and
``log p_c = z_c - lse``.

Backward of softmax (Jacobian dp_c/dz_k = p_c (delta_ck - p_k)) contracted with
an upstream gradient g::

    dL/dz_k = sum_c g_c p_c (delta_ck - p_k) = p_k (g_k - sum_c g_c p_c)

Backward of log-softmax (d log p_c / dz_k = delta_ck - p_k)::

    dL/dz_k = sum_c g_c (delta_ck - p_k) = g_k - p_k sum_c g_c,   p = exp(log p)

Cross-entropy of pixel i with target class t_i, class weights w (all 1 when
None) and label smoothing eps (the target distribution puts 1 - eps on t_i and
spreads eps uniformly over the C classes)::

    loss_i = (1 - eps) w[t_i] (-log p[i, t_i]) + (eps / C) sum_c w[c] (-log p[i, c])

and loss_i = 0 where t_i == ignore_index. Reductions (exactly torch 2.13's
``F.cross_entropy``, checked against torch itself):

* 'none': the (N, S) map of loss_i;
* 'sum':  sum_i loss_i;
* 'mean': sum_i loss_i / D with D = sum_{i not ignored} w[t_i]. The same D
  divides the smoothing term, with and without weights (so unweighted 'mean'
  divides by the number of non-ignored pixels, never by all pixels: older
  torch versions averaged the smoothing term over all pixels, 2.13 does not).
  If every pixel is ignored D = 0 and the loss is 0/0 = NaN (as torch).

Gradient of the cross-entropy. With d(-log p_k)/dz_c = p_c - delta_ck, for a
non-ignored pixel::

    dloss_i/dz_ic = (1 - eps) w[t_i] (p_ic - delta_{c t_i}) + (eps/C) sum_k w[k] (p_ic - delta_ck)
                  = A_i p_ic - (1 - eps) w[t_i] delta_{c t_i} - (eps/C) w[c]
                  = A_i (p_ic - q_ic),    A_i = (1 - eps) w[t_i] + (eps/C) sum_k w[k]

where q_i = ((1 - eps) w[t_i] onehot(t_i) + (eps/C) w) / A_i is the (weighted,
smoothed) target distribution. Without weights and smoothing this is the
familiar p - onehot. The reduction scales it: by 1 for 'none' and 'sum', by 1/D
for 'mean'; the upstream gradient then by gloss_i ('none') or gloss. Ignored
pixels do not enter the loss, so their gradient is exactly 0 (even when D = 0
makes 'mean' NaN, as torch).

The kernel interface follows from this: the gradient of the reduced loss,
A_i (p_i - q_i) (divided by D for 'mean'), needs p, which the forward computes
anyway, so the forward writes it (when a gradient is wanted) in the same pass
over the logits -- D depends on the targets alone, so it is known before that
pass. The backward multiplies by gloss, which is 1 in the usual
``loss.backward()`` on a reduced loss: a backend may then return the forward's
array itself and skip the pass. Targets outside [0, C) that are not
``ignore_index`` are counted (and treated as ignored, so every gather stays in
range): the caller raises on a non-zero count, without copying the targets anywhere.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "softmax_forward",
    "softmax_backward",
    "log_softmax_forward",
    "log_softmax_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
]


def _shifted(x, dim):
    """z - max z along dim: every entry <= 0, the largest exactly 0."""
    return x - x.max(axis=dim, keepdims=True)


def softmax_forward(x, dim):
    """p = exp(x - max) / sum exp(x - max) along ``dim``."""
    e = np.exp(_shifted(x, dim))
    return e / e.sum(axis=dim, keepdims=True)


def softmax_backward(y, gy, dim):
    """gx = y * (gy - sum(gy * y, dim)), from the softmax Jacobian (module docstring)."""
    return y * (gy - (gy * y).sum(axis=dim, keepdims=True))


def log_softmax_forward(x, dim):
    """log p = (x - max) - log sum exp(x - max) along ``dim``."""
    z = _shifted(x, dim)
    return z - np.log(np.exp(z).sum(axis=dim, keepdims=True))


def log_softmax_backward(y, gy, dim):
    """gx = gy - exp(y) * sum(gy, dim), y = log p (module docstring)."""
    return gy - np.exp(y) * gy.sum(axis=dim, keepdims=True)


def _pixel_weights(target, weight, ignore_index, num_classes, dtype):
    """(valid, t, w, w_t, n_invalid): the kept pixels (not ignored, target in [0, C)),
    targets with the other pixels set to class 0 (any valid index, so gathers stay
    in range), the class weights (ones when None), each pixel's weight w[t_i] (0
    where not kept) and the number of targets outside [0, C) that are not ignore_index."""
    in_range = (target >= 0) & (target < num_classes)
    not_ignored = target != ignore_index
    valid = not_ignored & in_range
    t = np.where(valid, target, 0)
    w = np.ones(num_classes, dtype) if weight is None else weight
    return valid, t, w, np.where(valid, w[t], 0).astype(dtype), np.int64((not_ignored & ~in_range).sum())


def cross_entropy_forward(logits, target, weight, ignore_index, reduction, label_smoothing, need_grad):
    """(loss, dlogits, denom, n_invalid), per the module docstring.

    logits (N, C, S), target (N, S) int64, weight (C,) or None. loss: (N, S) for
    'none', else 0-d. dlogits (N, C, S): the gradient of the reduced loss for
    gloss = 1, A_i (p_i - q_i) written out as A_i p - (1-eps) w[t_i] onehot -
    (eps/C) w, divided by D for 'mean'; 0 at pixels not kept; None unless
    ``need_grad``. denom: 0-d float64, D = sum of w[t_i] over the kept pixels.
    n_invalid: 0-d int64, the number of targets outside [0, C) that are not
    ignore_index (treated as ignored here; the caller raises).
    """
    n_classes, eps = logits.shape[1], label_smoothing
    # (x - m) - log sum exp(x - m), not x - lse: lse = m + log(...) would round at m's magnitude
    logp = log_softmax_forward(logits, 1)
    valid, t, w, w_t, n_invalid = _pixel_weights(target, weight, ignore_index, n_classes, logits.dtype)
    nll = -np.take_along_axis(logp, t[:, None], axis=1)[:, 0]
    smooth = -(w[None, :, None] * logp).sum(axis=1)
    loss = np.where(valid, (1 - eps) * w_t * nll + (eps / n_classes) * smooth, 0).astype(logits.dtype)
    denom = np.asarray(w_t.sum(dtype=np.float64))
    dlogits = None
    if need_grad:
        a = (1 - eps) * w_t + (eps / n_classes) * w.sum()
        onehot = np.arange(n_classes)[None, :, None] == t[:, None, :]
        g = a[:, None] * np.exp(logp) - (1 - eps) * w_t[:, None] * onehot - (eps / n_classes) * w[None, :, None]
        if reduction == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):  # D = 0: inf/NaN at kept pixels (of weight 0), as torch
                g = g / denom
        dlogits = np.where(valid[:, None, :], g, 0).astype(logits.dtype)
    if reduction != "none":
        total = loss.sum()
        if reduction == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):  # every pixel ignored: 0/0 = NaN, as torch
                total = total / denom
        loss = np.asarray(total, dtype=logits.dtype)
    return loss, dlogits, denom, np.asarray(n_invalid)


def cross_entropy_backward(dlogits, gloss, reduction):
    """glogits = dlogits * gloss_i ('none') or dlogits * gloss ('mean' and 'sum': the forward divided by D).

    A zero of dlogits stays exactly 0, whatever gloss (inf or NaN included): ignored
    pixels get 0, as torch's.
    """
    scale = gloss[:, None, :] if reduction == "none" else gloss
    with np.errstate(invalid="ignore"):
        g = np.where(dlogits == 0, 0, dlogits * scale)
    return g.astype(dlogits.dtype)
