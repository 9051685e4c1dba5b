"""Synchronised batch normalisation: the statistics of the global batch, not of this rank's shard.

With W ranks of batch B, a plain BatchNorm2d normalises each rank's B images by
their own mean and variance: a different function from one process normalising
W*B images. SyncBatchNorm2d sums the statistics over the ranks, so every rank
normalises with the statistics of the whole batch (M = the number of values
per channel over all ranks)::

    forward   sum_c, count             all-reduced  -> mean_c = sum_c / M
              sum_i (x_i - mean_c)^2   all-reduced  -> var_c  (biased)
              y = w (x - mean) invstd + b     (the backend's batch_norm_forward)

The variance is the sum of squared deviations from the global mean (two
all-reduces of C values, in float64), not sum(x^2)/M - mean^2 from one: the
one-pass formula cancels catastrophically when |mean| >> std, which is why
the single-process reference uses two passes too (kernels/batch_norm/reference.py).

Backward (the derivation in kernels/batch_norm/reference.py, with the means
taken over all M values): with xhat = (x - mean) invstd,

    dL/dx_i = w invstd (gy_i - sum(gy)/M - xhat_i sum(gy xhat)/M)

where both sums run over every rank, so the backward all-reduces these two
per-channel sums (2C values). The gradients of w and b are this rank's own sums
sum(gy xhat) and sum(gy); the gradient reducer averages them like any other
parameter's. Every rank updates its running statistics from the same global
mean and variance, so they stay identical. At world 1 every all-reduce is the
identity and the layer computes what BatchNorm2d computes.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from .. import functional as F
from ..autograd import Function
from ..nn.layers import BatchNorm2d
from .comm import world


def _per_channel(v):
    return v.reshape(1, -1, 1, 1)


AXES = (0, 2, 3)


class SyncBatchNormFunction(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps, comm):
        ctx.kernels, ctx.count, ctx.comm = backend.current(), count, comm
        y, xhat, invstd = ctx.kernels.batch_norm_forward(x, mean, var, weight, bias, eps)
        ctx.save_for_backward(xhat, invstd, weight)
        return y

    @staticmethod
    def backward(ctx, gy):
        xhat, invstd, weight = ctx.saved_tensors
        xp = backend.array_module(gy)
        c = gy.shape[1]
        sums = xp.empty(2 * c, np.float64)
        sums[:c] = gy.sum(axis=AXES, dtype=np.float64)
        sums[c:] = (gy * xhat).sum(axis=AXES, dtype=np.float64)
        gbias, gweight = sums[:c].astype(gy.dtype), sums[c:].astype(gy.dtype)  # this rank's, before the sum
        ctx.comm.allreduce_(sums)
        scale = invstd.astype(np.float64) if weight is None else invstd * weight.astype(np.float64)
        centred = gy - _per_channel(sums[:c] / ctx.count) - xhat * _per_channel(sums[c:] / ctx.count)
        gx = (_per_channel(scale) * centred).astype(gy.dtype)
        need = ctx.needs_input_grad
        return gx, gweight if need[1] else None, gbias if need[2] else None


def sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, comm):
    """Training-mode batch norm with statistics summed over the ranks of ``comm`` (module docstring)."""
    if x.ndim != 4:
        raise ValueError(f"SyncBatchNorm2d expects (N, C, H, W) input, got shape {x.shape}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        F._same_dtype(t, x.dtype, name)
    if not (isinstance(momentum, numbers.Real) and 0 <= momentum <= 1):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    x = F._contig_tensor(x)
    c = x.shape[1]
    x64 = x.data.astype(np.float64)
    stats = x.xp.empty(c + 1, np.float64)
    stats[:c] = x64.sum(axis=AXES)
    stats[c] = x.numel() // c
    comm.allreduce_(stats)
    count = float(stats[c])
    if count <= 1:
        raise ValueError(f"SyncBatchNorm2d in training mode needs more than 1 value per channel over all ranks, got {count:g}")
    mean = stats[:c] / count
    sq = ((x64 - _per_channel(mean)) ** 2).sum(axis=AXES)
    comm.allreduce_(sq)
    var = sq / count
    if running_mean is not None:
        running_mean.data *= 1 - momentum
        running_mean.data += (momentum * mean).astype(running_mean.dtype)
        running_var.data *= 1 - momentum
        running_var.data += (momentum * count / (count - 1) * var).astype(running_var.dtype)
    return SyncBatchNormFunction.apply(
        x, weight, bias, mean=mean.astype(x.dtype), var=var.astype(x.dtype),
        count=count, eps=float(eps), comm=comm,
    )


class SyncBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch of all ranks (module docstring).

    ``comm`` defaults to the world of :mod:`minseg.distributed` at call time.
    Evaluation uses the running statistics, exactly as BatchNorm2d.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.comm = comm

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        if self.track_running_stats:
            self.num_batches_tracked.data += 1
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return sync_batch_norm(F._float_tensor(x, "input"), *running, self.weight, self.bias, self.momentum, self.eps,
                               self.comm or world())


def convert_sync_batchnorm(module):
    """Replace every BatchNorm2d inside ``module`` by a SyncBatchNorm2d; returns the (converted) module.

    The new layers take over the old ones' parameters, buffers and settings
    themselves, not copies, so an optimizer that already holds the parameters
    keeps working and ``state_dict`` keys do not change.
    """

    def convert(m):
        if type(m) is BatchNorm2d:
            sync = SyncBatchNorm2d.__new__(SyncBatchNorm2d)
            sync.__dict__.update(m.__dict__)
            object.__setattr__(sync, "comm", None)
            return sync
        for name, child in list(m._modules.items()):
            setattr(m, name, convert(child))
        return m

    return convert(module)


__all__ = ["SyncBatchNorm2d", "SyncBatchNormFunction", "sync_batch_norm", "convert_sync_batchnorm"]
