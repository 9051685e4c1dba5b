"""Data-parallel training: same weights everywhere, gradients averaged, the loss normalised over all ranks.

The recipe of ChainerMN, Horovod and PyTorch DDP, in four steps:

1. :func:`broadcast_parameters` copies rank 0's parameters and buffers to every
   rank once, so all replicas start equal.
2. Each rank computes the loss of its own shard of the global batch with
   :func:`cross_entropy` and runs backward.
3. :class:`GradientReducer` sums the gradients over the ranks and divides by
   the world size W. It packs them into flat buckets of about 1 MiB, in
   reverse parameter order (the order backward finishes them, so that a
   future version can overlap communication with the backward), and reduces
   the buckets one after another in the same order on every rank: one
   all-reduce call per bucket instead of one per parameter.
4. Every rank applies the same optimizer step to the same averaged gradient,
   so the replicas stay identical without exchanging weights again.
   :class:`DistributedOptimizer` wraps an optimizer so that ``step()`` does 3 + 4.

Exact loss normalisation. With ``ignore_index`` the mean cross-entropy of the
global batch divides the sum of the per-pixel losses l_i by the number N of
valid pixels *of all ranks*, not of one rank. Rank r therefore minimises::

    L_r = W / N * sum_{i on rank r} l_i

and the average the reducer forms is (1/W) sum_r dL_r = d/dtheta (sum_i l_i / N),
the gradient of one process that holds the whole batch. Dividing each rank's
sum by its own count instead would weight the pixels of a rank with few valid
pixels more heavily.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor
from .comm import world

BUCKET_BYTES = 1 << 20  # 1 MiB: PyTorch DDP's first bucket size; large enough that latency is amortised


def broadcast_parameters(model, root: int = 0, comm=None) -> None:
    """Overwrite every parameter and buffer of ``model`` with rank ``root``'s, in place."""
    comm = comm or world()
    for _, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.data.flags.c_contiguous:
            t.data = backend.array_module(t.data).ascontiguousarray(t.data)
        comm.broadcast_(t.data, root)


def plan_buckets(shapes_dtypes, bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Parameter indices grouped into buckets, last parameter first.

    A bucket holds parameters of one dtype and closes before it would grow past
    ``bucket_bytes``; a parameter larger than that gets a bucket of its own.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets, current, size, dtype = [], [], 0, None
    for i in reversed(range(len(shapes_dtypes))):
        shape, dt = shapes_dtypes[i]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        if current and (dt != dtype or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size, dtype = size + nbytes, dt
    if current:
        buckets.append(current)
    return buckets


class GradientReducer:
    """Averages the gradients of ``params`` over the ranks in flat buckets (see the module docstring).

    A parameter without a gradient on this rank contributes zeros, and gets
    the averaged gradient of the others: every rank must take part in every
    bucket, or the all-reduces would pair up wrongly.
    """

    def __init__(self, params, comm=None, bucket_bytes: int = BUCKET_BYTES):
        self.params = list(params)
        self.comm = comm or world()
        self.buckets = plan_buckets([(p.shape, p.dtype) for p in self.params], bucket_bytes)
        self._flat: dict[int, object] = {}  # one buffer per bucket, allocated on first use and reused

    def bucket_nbytes(self) -> list[int]:
        return [sum(self.params[i].data.nbytes for i in b) for b in self.buckets]

    def _buffer(self, k, bucket):
        p0 = self.params[bucket[0]]
        n = sum(self.params[i].numel() for i in bucket)
        flat = self._flat.get(k)
        if flat is None or flat.size != n or flat.dtype != p0.dtype or backend.array_module(flat) is not p0.xp:
            flat = self._flat[k] = p0.xp.empty(n, p0.dtype)
        return flat

    def reduce(self, bucket_timer=None) -> None:
        """All-reduce every bucket in order and divide by the world size (nothing to do at world 1).

        ``bucket_timer``, if given, is a context-manager factory wrapped around each
        all-reduce call (the ddp benchmark times them).
        """
        size = self.comm.size
        if size == 1:
            return
        for k, bucket in enumerate(self.buckets):
            flat = self._buffer(k, bucket)
            offset = 0
            for i in bucket:
                p = self.params[i]
                n = p.numel()
                flat[offset : offset + n] = 0 if p.grad is None else p.grad.data.reshape(-1)
                offset += n
            if bucket_timer is None:
                self.comm.allreduce_(flat)
            else:
                with bucket_timer(flat.nbytes):
                    self.comm.allreduce_(flat)
            flat /= size
            offset = 0
            for i in bucket:
                p = self.params[i]
                n = p.numel()
                if p.grad is None:
                    p.grad = Tensor(flat[offset : offset + n].reshape(p.shape).copy())
                else:
                    p.grad.data[...] = flat[offset : offset + n].reshape(p.shape)
                offset += n


class DistributedOptimizer:
    """``optimizer`` whose ``step()`` first averages the gradients over the ranks (Horovod's name).

    Everything else (``lr``, ``zero_grad``, ``state_dict``, ...) is the wrapped
    optimizer's, so a learning-rate schedule built on the inner optimizer and
    checkpoints work unchanged.
    """

    def __init__(self, optimizer, comm=None, bucket_bytes: int = BUCKET_BYTES):
        self.__dict__["optimizer"] = optimizer
        self.__dict__["reducer"] = GradientReducer(optimizer.params, comm, bucket_bytes)

    def step(self) -> None:
        self.reducer.reduce()
        self.optimizer.step()

    def __getattr__(self, name):
        return getattr(self.__dict__["optimizer"], name)

    def __setattr__(self, name, value):
        setattr(self.optimizer, name, value)


def count_valid(target, ignore_index: int, comm=None, weight=None):
    """Pixels of ``target`` (this rank's masks) that are not ``ignore_index``, summed over all ranks.

    With a class ``weight`` (C,), the sum of ``weight[target]`` over those pixels instead:
    torch's denominator of a weighted 'mean' cross-entropy.
    """
    comm = comm or world()
    t = backend.to_numpy(getattr(target, "data", target))
    keep = t != ignore_index
    if weight is None:
        return comm.allreduce_object(int(keep.sum()))
    w = backend.to_numpy(getattr(weight, "data", weight)).astype(np.float64)
    return comm.allreduce_object(float(w[t[keep]].sum()))


def cross_entropy(input, target, ignore_index: int = -100, valid=None, comm=None, weight=None) -> Tensor:
    """This rank's share of the global batch's mean cross-entropy: W / N * (sum of its pixel losses).

    N = ``valid`` (from :func:`count_valid`; counted here when None) is the
    number of non-ignored pixels of all ranks (with ``weight``, the sum of their
    class weights, as torch's weighted mean divides by). At world 1 this is
    ``F.cross_entropy(input, target, weight, ignore_index=ignore_index)``. Averaging the
    W ranks' values gives the global mean loss, as averaging their gradients
    gives its gradient.
    """
    comm = comm or world()
    if comm.size == 1:
        return F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index)
    valid = count_valid(target, ignore_index, comm, weight) if valid is None else valid
    if not valid > 0:
        raise ValueError(f"every pixel of the global batch equals ignore_index={ignore_index} (or has weight 0): "
                         "the mean loss is 0/0")
    return F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction="sum") * (comm.size / valid)


__all__ = ["BUCKET_BYTES", "broadcast_parameters", "plan_buckets", "GradientReducer", "DistributedOptimizer",
           "count_valid", "cross_entropy"]
