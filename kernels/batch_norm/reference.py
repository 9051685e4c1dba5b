"""Batch normalisation: the NumPy definition.

For each channel c, over the M = N * H * W values x_i of that channel::

    mean = (1/M) sum_i x_i,      var = (1/M) sum_i (x_i - mean)^2      (biased)
    invstd = 1 / sqrt(var + eps)
    xhat_i = (x_i - mean) * invstd
    y_i    = w xhat_i + b        (w = 1, b = 0 when weight / bias are None)

In training the statistics are the batch's own (``batch_norm_stats``); in
evaluation they are the running estimates, i.e. constants. The statistics are
accumulated in float64 with the two-pass formula (mean first, then the mean
squared deviation): the one-pass E[x^2] - E[x]^2 cancels catastrophically in
float32 when |mean| >> std.

Backward. Let h_i = dL/dxhat_i = w gy_i. The affine parameters get
``gweight = sum_i gy_i xhat_i`` and ``gbias = sum_i gy_i`` (per channel).

Evaluation: mean and invstd are constants, so dL/dx_i = h_i invstd.

Training: mean and var depend on every x_j of the channel. With
d mean/dx_i = 1/M and d var/dx_i = (2/M)(x_i - mean), i.e.
d invstd/dx_i = -invstd^3 (x_i - mean)/M = -invstd^2 xhat_i / M::

    dxhat_j/dx_i = invstd (delta_ij - 1/M) + (x_j - mean) d invstd/dx_i
                 = invstd (delta_ij - 1/M - xhat_j xhat_i / M)

    dL/dx_i = sum_j h_j dxhat_j/dx_i
            = invstd (h_i - mean_j(h_j) - xhat_i mean_j(h_j xhat_j))
            = invstd w (gy_i - mean(gy) - xhat_i mean(gy xhat))

The two means are gbias/M and gweight/M, so the backward needs just one
reduction pass and one elementwise pass.

Fused ReLU (``relu=True``): the forward returns y = max(w xhat + b, 0) (NaN
stays NaN, as torch's relu), so batch norm followed by ReLU is one pass over
memory instead of two. Backward: by the chain rule the ReLU multiplies the
upstream gradient by relu'(v) = 1 where v = w xhat + b > 0, else 0 (0 at
v == 0 exactly, as torch). v > 0 exactly where the fused output y > 0, so the
backward takes the output (``relu_output``) and runs the batch-norm backward
above on the masked gradient::

    gy_eff_i = gy_i * (y_i > 0)
    gbias = sum_i gy_eff_i,   gweight = sum_i gy_eff_i xhat_i,
    dL/dx_i = invstd w (gy_eff_i - gbias/M - xhat_i gweight/M)    (training)

The output is kept alive anyway (it is the next layer's input), so the mask
costs no extra memory.

Running statistics (training, ``batch_norm_training``): with momentum m, after
each batch, in place::

    running_mean <- (1 - m) running_mean + m mean
    running_var  <- (1 - m) running_var  + m M/(M - 1) var

The running variance is the unbiased estimate (M/(M - 1) times the biased
batch variance), as torch's; evaluation normalises with these. They are
constants to autograd: no gradient flows through them.
"""
from __future__ import annotations

import numpy as np

from kernels.relu.reference import relu_backward, relu_forward

__all__ = ["batch_norm_stats", "batch_norm_forward", "batch_norm_training", "batch_norm_backward"]


def _axes(x):
    """Every axis except the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, ndim):
    """(C,) -> (1, C, 1, ...) so that it broadcasts along axis 1."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_stats(x):
    """(mean, var) per channel over N and the spatial axes, var biased; float64 two-pass."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=_axes(x))
    var = ((x64 - _per_channel(mean, x.ndim)) ** 2).mean(axis=_axes(x))
    return mean.astype(x.dtype), var.astype(x.dtype)


def batch_norm_forward(x, mean, var, weight, bias, eps, relu=False):
    """(y, xhat, invstd): invstd = 1/sqrt(var + eps), xhat = (x - mean) invstd, y = w xhat + b.

    relu=True: y = max(w xhat + b, 0), batch norm fused with the ReLU after it.
    """
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(x.dtype)
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    y = xhat.copy() if weight is None else xhat * _per_channel(weight, x.ndim)
    if bias is not None:
        y += _per_channel(bias, x.ndim)
    return (relu_forward(y) if relu else y), xhat, invstd


def update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """The running-statistic update of the module docstring, in place; either array may be None.

    ``count`` = M, the values per channel the batch statistics came from.
    """
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * mean
    if running_var is not None:
        running_var *= 1 - momentum
        running_var += (momentum * count / (count - 1)) * var


def batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    """(y, xhat, invstd) of the training-mode forward: the batch's statistics normalise x, and
    update the running statistics in place (either may be None); ``batch_norm_forward`` otherwise.

    One call for what a training step does per layer: the backends fuse the three steps
    (statistics, update, normalisation) so that a step pays one call, not three.
    """
    mean, var = batch_norm_stats(x)
    update_running_stats(running_mean, running_var, mean, var, momentum, x.size // x.shape[1])
    return batch_norm_forward(x, mean, var, weight, bias, eps, relu)


def batch_norm_backward(gy, xhat, invstd, weight, training, relu_output=None):
    """(gx, gweight, gbias), derived in the module docstring.

    gweight and gbias are always returned (the kernel cannot know whether a bias
    exists); the caller keeps the ones it needs. ``weight`` None means w = 1.
    ``relu_output``: the output y of the fused forward (``relu=True``); given, the
    gradient flows only where y > 0 (gy_eff = gy * (y > 0)), else it is None.
    """
    if relu_output is not None:
        gy = relu_backward(relu_output, gy)
    axes, nd = _axes(gy), gy.ndim
    gbias = gy.sum(axis=axes, dtype=np.float64)
    gweight = (gy * xhat).sum(axis=axes, dtype=np.float64)
    scale = invstd.astype(np.float64) if weight is None else invstd * weight.astype(np.float64)
    if training:
        m = gy.size // gy.shape[1]
        centred = gy - _per_channel(gbias / m, nd) - xhat * _per_channel(gweight / m, nd)
        gx = _per_channel(scale, nd) * centred
    else:
        gx = gy * _per_channel(scale, nd)
    return gx.astype(gy.dtype), gweight.astype(gy.dtype), gbias.astype(gy.dtype)
