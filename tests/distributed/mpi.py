"""Running a script on several MPI ranks from a test: ``mpiexec -n W python -m mpi4py script``.

``python -m mpi4py`` makes an uncaught exception on any rank abort the whole job
(a plain ``python script`` would leave the other ranks waiting forever), so a
failing assertion in a worker fails the test instead of hanging it; the timeout
is the last resort. One Numba thread per rank: two ranks share this machine's cores.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")


def find_mpiexec() -> str | None:
    """The mpiexec next to this Python (the mpich wheel puts it in the venv's bin), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
requires_mpi = pytest.mark.skipif(
    not (HAVE_MPI4PY and MPIEXEC),
    reason="multi-rank tests need mpi4py and mpiexec: pip install -e '.[distributed]'"
    + ("" if HAVE_MPI4PY else " (mpi4py is missing)") + ("" if MPIEXEC else " (mpiexec is missing)"),
)


def rank_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    # A test run inside an MPI job must not make the children believe they are ranks of it.
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_ranks(n: int, args, timeout: float, mpi4py_runner: bool = True, cwd=None, **env) -> subprocess.CompletedProcess:
    """``mpiexec -n n python [-m mpi4py] *args``; the caller checks returncode and output."""
    runner = ["-m", "mpi4py"] if mpi4py_runner else []
    return subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, *runner, *args],
        cwd=cwd or ROOT, env=rank_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def explain(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
