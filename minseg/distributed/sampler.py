"""Which samples each rank reads: a disjoint, equally long shard of one shared order.

Training (:class:`DistributedSampler`, torch's semantics): every rank draws the
same permutation of the n indices from (seed, epoch) -- the permutation
:class:`~minseg.data.DataLoader` draws for a single process -- pads it by
wrapping around to a multiple of the world size W (or, with ``drop_last``,
cuts it to one), and takes every W-th index starting at its rank::

    order  = default_rng([seed, epoch]).permutation(n)      (arange(n) without shuffle)
    padded = (order repeated)[:W * ceil(n / W)]              (drop_last: order[:W * floor(n / W)])
    shard  = padded[rank::W]

So batch k of size B on rank r holds padded[W B k + r + W j], j < B: the W
ranks' batch k together are exactly padded[W B k : W B (k + 1)], the batch k of
one process with batch W B. Padding repeats a few samples so that every rank
takes the same number of steps (a rank with one step fewer would leave the
others waiting in an all-reduce forever).

Evaluation (:func:`shard_indices`) needs no equal lengths -- every rank does
one all-reduce at the end -- and must not pad (a repeated image would count
twice in the metrics), so each rank takes a contiguous block of
``n // W`` or ``n // W + 1`` indices.
"""
from __future__ import annotations

import numpy as np


def _check_rank(num_replicas: int, rank: int):
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas - 1}] for num_replicas={num_replicas}, got {rank}")


class DistributedSampler:
    """This rank's indices of a seed+epoch permutation; pass it as ``DataLoader(..., sampler=...)``.

    ``num_replicas``/``rank`` default to the world of :mod:`minseg.distributed`.
    Call ``set_epoch(e)`` before each epoch (the DataLoader does it for you),
    or every epoch repeats the same order.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        from .comm import world

        num_replicas = world().size if num_replicas is None else int(num_replicas)
        rank = world().rank if rank is None else int(rank)
        _check_rank(num_replicas, rank)
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, int(seed), drop_last, 0
        n = len(dataset)
        self.total_size = (n // num_replicas if drop_last else -(-n // num_replicas)) * num_replicas
        self.num_samples = self.total_size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.total_size > n:  # wrap around (several times when n < W)
            order = np.resize(order, self.total_size)
        return iter(order[: self.total_size][self.rank :: self.num_replicas].tolist())


def shard_indices(n: int, num_replicas: int | None = None, rank: int | None = None) -> range:
    """This rank's contiguous, unpadded block of range(n); the blocks of all ranks partition it."""
    from .comm import world

    num_replicas = world().size if num_replicas is None else int(num_replicas)
    rank = world().rank if rank is None else int(rank)
    _check_rank(num_replicas, rank)
    return range(rank * n // num_replicas, (rank + 1) * n // num_replicas)


__all__ = ["DistributedSampler", "shard_indices"]
