"""DistributedSampler and shard_indices: properties over world sizes, ranks, dataset sizes and epochs.

No MPI needed: the sampler takes ``num_replicas`` and ``rank`` explicitly, so every
rank of a world is simulated in one process.
"""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minseg.data import DataLoader
from minseg.distributed import DistributedSampler, shard_indices


class Indices:
    """A dataset whose sample i is (an image filled with i, a mask of i): batches show their indices."""

    classes, num_classes, in_channels, uniform_size = ("x",), 1, 1, True

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((1, 2, 2), i, np.float32), np.full((2, 2), i, np.int64)


worlds = st.integers(1, 5)


@given(n=st.integers(0, 40), world=worlds, seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 5),
       shuffle=st.booleans(), drop_last=st.booleans())
@example(n=0, world=3, seed=0, epoch=0, shuffle=True, drop_last=False)  # empty dataset
@example(n=2, world=5, seed=0, epoch=0, shuffle=True, drop_last=False)  # fewer samples than ranks: wraps twice
@example(n=2, world=5, seed=0, epoch=0, shuffle=True, drop_last=True)  # ... or nothing at all
def test_shards_are_equal_disjoint_slices_of_one_padded_order(n, world, seed, epoch, shuffle, drop_last):
    samplers = [DistributedSampler(Indices(n), world, r, shuffle=shuffle, seed=seed, drop_last=drop_last) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    shards = [list(s) for s in samplers]
    per_rank = n // world if drop_last else -(-n // world)
    assert all(len(shard) == per_rank == len(s) for shard, s in zip(shards, samplers))  # equal lengths
    # Interleaving the shards gives back the one order every rank drew: rank r holds positions r, r+W, ...
    interleaved = [shards[p % world][p // world] for p in range(world * per_rank)]
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    expected = order[: world * per_rank] if drop_last else np.resize(order, world * per_rank)
    assert interleaved == expected.tolist()
    # Disjoint: without padding no index is on two ranks (padding repeats from the start).
    if world * per_rank <= n:
        assert len(set(interleaved)) == len(interleaved)
    else:
        assert set(interleaved) == set(range(n))


@given(n_batches=st.integers(1, 4), world=worlds, batch=st.integers(1, 3), seed=st.integers(0, 100),
       epoch=st.integers(0, 3), extra=st.integers(0, 5))
@example(n_batches=2, world=2, batch=2, seed=0, epoch=1, extra=3)  # a short last batch
def test_union_of_the_ranks_batch_k_is_the_single_process_batch_k(n_batches, world, batch, seed, epoch, extra):
    """For every step k, the W ranks' batch k (size B) together are one process's batch k (size W*B).

    n = W*B*n_batches + extra*W keeps the sampler unpadded (padding would add samples the
    single process does not see); extra*W makes the last batch short on every rank."""
    n = world * batch * n_batches + extra * world
    single = DataLoader(Indices(n), world * batch, shuffle=True, seed=seed)
    ranks = [DataLoader(Indices(n), batch, seed=seed, sampler=DistributedSampler(Indices(n), world, r, seed=seed))
             for r in range(world)]
    for loader in (single, *ranks):
        loader.set_epoch(epoch)
    rank_batches = [list(loader) for loader in ranks]
    single_batches = list(single)
    assert all(len(b) == len(single_batches) == len(loader) for b, loader in zip(rank_batches, ranks))  # same step count
    for k, (images, masks) in enumerate(single_batches):
        union = np.concatenate([rank_batches[r][k][1][:, 0, 0] for r in range(world)])
        assert sorted(union.tolist()) == sorted(masks[:, 0, 0].tolist())
        # The same images too: augmentation seeds depend on (seed, epoch, index), not on the rank.
        got = np.concatenate([rank_batches[r][k][0] for r in range(world)])
        assert sorted(got[:, 0, 0, 0].tolist()) == sorted(images[:, 0, 0, 0].tolist())


def test_set_epoch_changes_the_order_and_the_loader_passes_its_epoch():
    s = DistributedSampler(Indices(20), 2, 0, seed=1)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    loader = DataLoader(Indices(20), 4, seed=1, sampler=s)
    loader.set_epoch(0)
    assert np.concatenate([m[:, 0, 0] for _, m in loader]).tolist() == first
    assert s.epoch == 0
    list(loader)  # the loader's second pass is epoch 1, and so is the sampler's
    assert s.epoch == 1


@given(n=st.integers(0, 30), world=worlds)
@example(n=3, world=5)  # some ranks get nothing
def test_evaluation_shards_partition_the_dataset_without_padding(n, world):
    shards = [shard_indices(n, world, r) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_replicas=0, rank=0), "num_replicas must be >= 1, got 0"),
    (dict(num_replicas=2, rank=2), "rank must be in [0, 1] for num_replicas=2, got 2"),
    (dict(num_replicas=2, rank=-1), "rank must be in [0, 1] for num_replicas=2, got -1"),
])
def test_bad_rank_or_world_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError) as e:
        DistributedSampler(Indices(4), **kwargs)
    assert message in str(e.value)
    with pytest.raises(ValueError) as e:
        shard_indices(4, kwargs["num_replicas"], kwargs["rank"])
    assert message in str(e.value)


def test_a_sampler_and_shuffle_exclude_each_other():
    with pytest.raises(ValueError, match="sampler and shuffle=True exclude each other"):
        DataLoader(Indices(4), 2, shuffle=True, sampler=DistributedSampler(Indices(4), 1, 0))
