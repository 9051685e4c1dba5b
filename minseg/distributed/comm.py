"""Processes and collectives: which rank am I, how many are we, sum and broadcast across all of us.

minseg does not start processes itself: MPI does (``mpiexec -n 2 python -m
mpi4py -m minseg train``, or several machines with a hostfile). :func:`init`
recognises such a launch by the variables the launcher sets -- MPICH and Intel
MPI (Hydra) set ``PMI_RANK``/``PMI_SIZE``, Open MPI sets
``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_SIZE`` -- and only then imports
mpi4py. A plain ``python`` run is a world of one whose collectives do nothing,
and mpi4py is never imported.

Every communicator has the same small interface:

``allreduce_(a)``       sum the array ``a`` over all ranks, in place (every rank gets the sum)
``broadcast_(a, root)`` overwrite ``a`` with rank ``root``'s ``a``, in place
``allreduce_object(v)`` the sum of a Python number over ranks
``broadcast_object(o)`` rank 0's picklable object, on every rank
``barrier()``           wait until every rank got here
``fail(code)``          this rank failed: end the job (every rank failed: a plain exit; else ``abort``)
``abort(code)``         end every process of the job at once

Which one sums the arrays: :class:`MPICommunicator` for NumPy arrays (and CuPy
arrays staged through host memory: the MPI wheels are not CUDA-aware), and
:class:`NCCLCommunicator` for CuPy arrays on GPUs, through ``cupy.cuda.nccl``
(ChainerMN's design: rank 0 makes the NCCL unique id and MPI broadcasts it).

Failure: if one rank dies while the others wait in a collective, the others
wait forever. :func:`init` therefore installs an excepthook (as ChainerMN's
``add_hook_to_abort``) that prints the traceback and calls ``fail``, which ends
every rank; ``python -m mpi4py`` does the same for scripts with ``MPI_Abort``.
``fail`` aborts only a rank that fails alone: ``MPI_Abort`` tears the job down
at once, and MPICH's mpiexec can drop what the ranks printed just before (a CI
run once ended with exit 2 and an empty stderr), so when every rank fails --
a bad argument fails all of them at the same line -- they exit normally.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

# (rank variable, size variable) that each MPI launcher family exports to its processes.
LAUNCHER_VARIABLES = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"))
COLLECTIVES = ("auto", "host", "nccl")


def launched_by_mpi(environ=None) -> tuple[int, int] | None:
    """(rank, size) that an MPI launcher put in the environment, or None for a plain run."""
    environ = os.environ if environ is None else environ
    for rank_var, size_var in LAUNCHER_VARIABLES:
        if rank_var in environ and size_var in environ:
            return int(environ[rank_var]), int(environ[size_var])
    return None


class LocalCommunicator:
    """A world of one: every collective is the identity (no MPI involved)."""

    rank, size, local_rank, local_size, name = 0, 1, 0, 1, "local"

    def allreduce_(self, a):
        return a

    def broadcast_(self, a, root: int = 0):
        return a

    def allreduce_object(self, value):
        return value

    def broadcast_object(self, obj, root: int = 0):
        return obj

    def barrier(self) -> None:
        pass

    def fail(self, code: int = 1) -> None:
        pass  # nobody else to end: the caller exits with its code

    def abort(self, code: int = 1) -> None:
        sys.exit(code)


def _check_array(a, what: str):
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} works in place and needs a C-contiguous array, got shape {a.shape} with strides {a.strides}")


class MPICommunicator:
    """Collectives over MPI's COMM_WORLD through mpi4py; GPU arrays go through host memory."""

    name = "MPI"

    def __init__(self):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # Ranks that share this machine's memory: each gets its share of the cores and its own GPU.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        # Only fail() uses this copy, so its barrier can never pair with a training collective.
        self.failures = self.comm.Dup()

    def allreduce_(self, a):
        _check_array(a, "allreduce_")
        if isinstance(a, np.ndarray):
            self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        else:  # a CuPy array: stage through the host
            host = a.get()
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            a.set(host)
        return a

    def broadcast_(self, a, root: int = 0):
        _check_array(a, "broadcast_")
        if isinstance(a, np.ndarray):
            self.comm.Bcast(a, root=root)
        else:
            host = a.get()
            self.comm.Bcast(host, root=root)
            a.set(host)
        return a

    def allreduce_object(self, value):
        return self.comm.allreduce(value, op=self.MPI.SUM)

    def broadcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def fail(self, code: int = 1, grace: float = 2.0) -> None:
        """This rank failed with ``code``: return if every rank fails within ``grace`` seconds, else abort the job.

        Returning lets each rank exit with its code and mpiexec forward all they printed. A rank
        that fails alone may leave the others in a collective forever, so after ``grace`` seconds
        it aborts them (the wait also gives mpiexec time to forward this rank's message first).
        """
        sys.stdout.flush()
        sys.stderr.flush()
        every_rank_failed = self.failures.Ibarrier()
        deadline = time.monotonic() + grace
        while not every_rank_failed.Test():
            if time.monotonic() > deadline:
                self.abort(code)
            time.sleep(0.005)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def nccl_module():
    """``cupy.cuda.nccl``, or a RuntimeError saying what is missing."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        raise RuntimeError("NCCL collectives need CuPy with NCCL: pip install 'minseg[gpu]' (cupy-cuda13x)") from None
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise RuntimeError(f"this CuPy has no NCCL support ({e}); install NCCL (pip install nvidia-nccl-cu13) "
                           "or use collectives='host'") from None
    if not getattr(nccl, "available", True):
        raise RuntimeError("this CuPy was built without NCCL; install NCCL (pip install nvidia-nccl-cu13) "
                           "or use collectives='host'")
    return nccl


class NCCLCommunicator:
    """CuPy arrays summed on the GPUs by NCCL, one GPU per rank; objects and barriers go over ``host``.

    The NCCL communicator is built from a unique id that rank 0 creates and
    ``host`` (MPI, or the local world of one) broadcasts. Reductions run on
    CuPy's current stream, which is the default stream the Numba kernels use,
    so a reduction starts after the backward kernels that wrote the gradients.
    """

    name = "NCCL"

    def __init__(self, host):
        import cupy

        self.nccl, self.host, self.cupy = nccl_module(), host, cupy
        self.rank, self.size = host.rank, host.size
        self.local_rank, self.local_size = host.local_rank, host.local_size
        cupy.cuda.Device(host.local_rank % cupy.cuda.runtime.getDeviceCount()).use()
        uid = host.broadcast_object(self.nccl.get_unique_id() if host.rank == 0 else None)
        self.comm = self.nccl.NcclCommunicator(host.size, uid, host.rank)
        self.dtypes = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32, np.dtype(np.float64): self.nccl.NCCL_FLOAT64,
                       np.dtype(np.int64): self.nccl.NCCL_INT64, np.dtype(np.int32): self.nccl.NCCL_INT32}

    def _nccl_dtype(self, a):
        if a.dtype not in self.dtypes:
            raise TypeError(f"NCCL collectives take {sorted(str(d) for d in self.dtypes)} arrays, got {a.dtype}")
        return self.dtypes[a.dtype]

    def allreduce_(self, a):
        if isinstance(a, np.ndarray):
            return self.host.allreduce_(a)
        _check_array(a, "allreduce_")
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.allReduce(a.data.ptr, a.data.ptr, a.size, self._nccl_dtype(a), self.nccl.NCCL_SUM, stream)
        return a

    def broadcast_(self, a, root: int = 0):
        if isinstance(a, np.ndarray):
            return self.host.broadcast_(a, root)
        _check_array(a, "broadcast_")
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.bcast(a.data.ptr, a.size, self._nccl_dtype(a), root, stream)
        return a

    def allreduce_object(self, value):
        return self.host.allreduce_object(value)

    def broadcast_object(self, obj, root: int = 0):
        return self.host.broadcast_object(obj, root)

    def barrier(self) -> None:
        self.host.barrier()

    def fail(self, code: int = 1) -> None:
        self.host.fail(code)

    def abort(self, code: int = 1) -> None:
        self.host.abort(code)


def choose_collectives(requested: str, backend_name: str, cuda_status: str, world: int) -> str:
    """'nccl' or 'host': which communicator sums the gradients.

    'auto' takes NCCL when the cuda backend runs on a real GPU, the world has
    more than one rank and CuPy has NCCL, else host (MPI) collectives. 'nccl'
    asked for explicitly raises a clear error where it cannot work.
    """
    if requested not in COLLECTIVES:
        raise ValueError(f"collectives must be one of {list(COLLECTIVES)}, got {requested!r}")
    if requested == "host":
        return "host"
    usable = backend_name == "cuda" and cuda_status == "gpu"
    if requested == "nccl":
        if backend_name != "cuda":
            raise ValueError(f"collectives='nccl' sums GPU arrays, but the active backend is {backend_name!r}; use the cuda backend")
        if not usable:
            raise RuntimeError(f"collectives='nccl' needs a real GPU, but CUDA is: {cuda_status}")
        nccl_module()
        return "nccl"
    if not usable or world == 1:
        return "host"
    try:
        nccl_module()
    except RuntimeError:
        return "host"  # host-staged MPI: slower, same sums
    return "nccl"


_world = None


def _abort_on_uncaught_exception(comm):
    """An excepthook that prints the traceback, then ends every rank (no rank waits forever)."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        sys.stderr.write(f"minseg.distributed: rank {comm.rank} raised {exc_type.__name__}; ending all {comm.size} ranks\n")
        comm.fail(1)

    sys.excepthook = hook


def init(collectives: str = "auto"):
    """Join the job's world (once; later calls return the same communicator).

    Under mpiexec: an MPI (or, on GPUs, NCCL) communicator and the abort-on-
    exception hook; in a plain run: a world of one, without importing mpi4py.
    ``collectives`` is 'auto', 'host' or 'nccl' (see :func:`choose_collectives`);
    the active backend decides what 'auto' means, so set the backend first.
    """
    global _world
    if _world is not None:
        return _world
    from .. import backend

    host = MPICommunicator() if launched_by_mpi() is not None else LocalCommunicator()
    if host.size > 1:
        _abort_on_uncaught_exception(host)
    status = backend.cuda_status() if backend.get_backend() == "cuda" else "not used"
    kind = choose_collectives(collectives, backend.get_backend(), status, host.size)
    _world = NCCLCommunicator(host) if kind == "nccl" else host
    return _world


def world():
    """The communicator of :func:`init` (a world of one before init)."""
    return _world if _world is not None else LocalCommunicator()


def rank() -> int:
    return world().rank


def world_size() -> int:
    return world().size


def is_main() -> bool:
    """Rank 0: the one that prints, writes checkpoints and draws pictures."""
    return world().rank == 0


def barrier() -> None:
    world().barrier()


def fail(code: int = 1) -> None:
    """This rank failed with exit status ``code``: make sure no other rank waits for it forever.

    Returns when every rank failed too (each then exits with its code); otherwise aborts the job.
    At world 1 it just returns.
    """
    world().fail(code)


def abort(code: int = 1) -> None:
    """End the whole job with exit status ``code`` at once (at world 1: just this process)."""
    world().abort(code)


def share_cores() -> int:
    """Give each rank on this machine its share of the cores as Numba threads (unless NUMBA_NUM_THREADS is set).

    Two ranks with all cores each would oversubscribe the machine. Returns the thread count.
    """
    import numba

    comm = world()
    if comm.local_size > 1 and "NUMBA_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, cores // comm.local_size)))
    return numba.get_num_threads()


__all__ = [
    "LAUNCHER_VARIABLES", "COLLECTIVES", "launched_by_mpi", "LocalCommunicator", "MPICommunicator", "NCCLCommunicator",
    "nccl_module", "choose_collectives", "init", "world", "rank", "world_size", "is_main", "barrier", "fail", "abort", "share_cores",
]
