"""Data-parallel training over processes and machines: MPI (mpi4py) for processes and host
buffers, NCCL (through CuPy) for GPU buffers.

    mpiexec -n 2 python -m mpi4py -m minseg train       # two ranks on this machine
    mpiexec -n 16 -f hosts python -m mpi4py -m minseg train

* :mod:`.comm` -- who is who (``init``, ``rank``, ``world_size``, ``is_main``,
  ``barrier``) and the collectives (in-place all-reduce and broadcast of arrays,
  of small objects); one failing rank aborts the job.
* :mod:`.sampler` -- ``DistributedSampler`` (each rank's shard of the training
  order) and ``shard_indices`` (unpadded evaluation shards).
* :mod:`.data_parallel` -- ``broadcast_parameters``, gradient averaging in flat
  buckets (``GradientReducer``, ``DistributedOptimizer``) and the exactly
  normalised ``cross_entropy``.
* :mod:`.sync_batch_norm` -- ``SyncBatchNorm2d`` and ``convert_sync_batchnorm``.

The contract: W ranks with batch B each train as one process with batch W*B
does, up to the order in which floats are summed (checked by
tests/distributed/).
"""
from .comm import (
    COLLECTIVES,
    LocalCommunicator,
    MPICommunicator,
    NCCLCommunicator,
    abort,
    barrier,
    choose_collectives,
    fail,
    init,
    is_main,
    launched_by_mpi,
    rank,
    share_cores,
    world,
    world_size,
)
from .data_parallel import (
    BUCKET_BYTES,
    DistributedOptimizer,
    GradientReducer,
    broadcast_parameters,
    count_valid,
    cross_entropy,
    plan_buckets,
)
from .sampler import DistributedSampler, shard_indices
from .sync_batch_norm import SyncBatchNorm2d, convert_sync_batchnorm

__all__ = [
    "COLLECTIVES", "LocalCommunicator", "MPICommunicator", "NCCLCommunicator", "abort", "barrier", "choose_collectives",
    "fail", "init", "is_main", "launched_by_mpi", "rank", "share_cores", "world", "world_size",
    "BUCKET_BYTES", "DistributedOptimizer", "GradientReducer", "broadcast_parameters", "count_valid", "cross_entropy",
    "plan_buckets", "DistributedSampler", "shard_indices", "SyncBatchNorm2d", "convert_sync_batchnorm",
]
