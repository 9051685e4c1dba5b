"""Long subprocesses that some tests check, started as soon as pytest knows they will be needed.

The suite runs serially on one core; a subprocess that only produces a report (the PTX
compile of every CUDA kernel, the simulated GPU command, the training-step benchmark) can
run on the machine's other core meanwhile. The jobs whose reports are read at the end run at
the lowest CPU priority (nice 19), so they use only what the tests leave; the job that
compiles the cpu kernels ahead of the tests runs at the tests' own priority, since the tests
wait for its work (``numba-warm`` below). Priorities hold only between the processes of one
session (``_own_group``): the jobs stay in the tests' session.
``tests/conftest.py`` starts the jobs whose tests were collected (not under pytest-xdist,
where every worker would start its own copy); the fixture that needs a job's output calls
:func:`result`, which starts it if nobody did and waits for it.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Job:
    argv: tuple  # after ``python``; "{outdir}" is replaced by a fresh temporary folder
    env: tuple  # (name, value) pairs added to the environment
    tests: str  # node-id prefix of the tests that read the result (or, for a job no test reads, that it serves)
    timeout: float
    read: bool = True  # tests read its result: they run last, when it has had the whole run to finish
    min_tests: int = 0  # start it only for a run of at least this many tests
    nice: int = 19  # its CPU priority: 19, the lowest, for a report that is read at the end


# Set in the jobs' environment: a pytest run that is itself a job starts no jobs of its own.
NO_JOBS = "MINSEG_TEST_NO_BACKGROUND_JOBS"


# The test files with cpu rows, in the order the numba-warm job runs them (pytest keeps the order given):
# first those this run reaches first after the CUDA simulator's tests (tests/grad) and the costliest
# (tests/kernels/test_conv2d.py: six versions in two dtypes), then the rest last first.
_FIRST = [*sorted((ROOT / "tests" / "grad").glob("test_*.py")), ROOT / "tests" / "kernels" / "test_conv2d.py"]
WARM_FILES = tuple(str(p.relative_to(ROOT)) for p in _FIRST + sorted(
    (f for d in ("kernels", "nn", "oracle") for f in (ROOT / "tests" / d).glob("test_*.py") if f not in _FIRST), reverse=True))

# ``train --quick`` also steps with the cpu backend (and its conv kernels at version 1) where Numba is installed
TRAIN_BACKENDS = ("numpy,cpu", "--conv-versions", "1") if importlib.util.find_spec("numba") else ("numpy",)

JOBS = {
    "ptx": Job(("-m", "benchmarks.ptx_report", "--json", "--cc", "80", "90"), (("NUMBA_ENABLE_CUDASIM", "0"),),
               "tests/cuda/test_ptx.py", 900),
    "gpu-simulate": Job(("-m", "benchmarks", "gpu", "--simulate", "--all", "{outdir}"), (("PYTHONPATH", str(ROOT)),),
                        "tests/test_gpu_command.py", 900),
    # one thread: the benchmark times, and a second thread would compete with the tests
    "train-quick": Job(("-m", "benchmarks", "train", "--quick", "--repeat", "2", "--threads", "1", "--backends", *TRAIN_BACKENDS,
                        "--no-cache-check", "--json", "{outdir}/train.json", "--plot", "{outdir}/train.png"),
                       (("PYTHONPATH", str(ROOT)),), "tests/test_benchmarks_smoke.py::test_train_quick", 600),
    # Compiles the cpu kernels ahead of the tests that use them: on a fresh clone (CI) their first calls
    # compile for 5-20 s each. It runs those same tests (the same argument types, so the same compiled
    # signatures) in a pytest of its own on the other core, and Numba's on-disk cache hands the results
    # over. It takes the files in an order of its own (WARM_FILES): ahead of this run where it has the
    # time, then from the end, so that the two do not compile the same kernels at the same time. Nothing reads its outcome: the
    # tests themselves run here as always (on a warm cache, the same tests take a fraction of the time).
    # Only for a run of most of the suite: a run of a few files gives it no head start. At the tests'
    # priority (nice 0): at nice 19 beside the other jobs it fell behind, and the tests compiled the
    # kernels themselves (tests/kernels/test_conv2d.py 76 s instead of 13 s; whole suite 5:21 vs 4:26).
    "numba-warm": Job(("-m", "pytest", "-q", "-p", "no:cacheprovider", *WARM_FILES, "-k", "cpu"),
                      (("PYTHONPATH", str(ROOT)), (NO_JOBS, "1")), "tests/kernels/", 900, read=False, min_tests=500,
                      nice=0),
}


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    outdir: Path


_running: dict = {}


def start(name: str) -> None:
    """Start job ``name`` unless it runs already."""
    if name in _running:
        return
    job = JOBS[name]
    outdir = Path(tempfile.mkdtemp(prefix=f"minseg-{name}-"))
    out, err = open(outdir / "stdout.txt", "w+"), open(outdir / "stderr.txt", "w+")
    argv = [sys.executable, *(a.replace("{outdir}", str(outdir)) for a in job.argv)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, **dict(job.env)), stdout=out, stderr=err, text=True,
                            preexec_fn=lambda: _own_group(job.nice))
    _running[name] = (proc, out, err, outdir)


def _own_group(nice) -> None:
    """Run in the job's process before it starts: a process group of its own, so that ending the job
    ends the subprocesses it starts too (ptx_report's workers), and the job's ``nice``, which they inherit.

    A group, not a session: Linux's scheduler (with autogroup, on by default) shares the CPU
    fairly between *sessions* first and applies nice only between the processes of one
    session, so a job in a session of its own (``setsid``, ``start_new_session``) competed with
    the tests as an equal whatever its nice value. Measured on the 2-core machine: a simulated
    CUDA test (thousands of GIL hand-overs) took 1.0-1.1 s beside four busy nice-19 processes
    of its own session and 2.0-2.5 s beside the same four each in a session of its own."""
    os.setpgid(0, 0)
    os.nice(nice)


def result(name: str) -> Finished:
    """Job ``name``'s exit status, output and folder, once it has ended (started here if needed)."""
    start(name)
    proc, out, err, outdir = _running[name]
    try:
        proc.wait(timeout=JOBS[name].timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
    out.seek(0)
    err.seek(0)
    return Finished(proc.returncode, out.read(), err.read(), outdir)


def stop_all() -> None:
    """End whatever still runs (a run that stopped early)."""
    for proc, out, err, _ in _running.values():
        _kill(proc)
        out.close()
        err.close()


def _kill(proc) -> None:
    """End a job and every process of its group (its own subprocesses, even after it ended)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has ended already
        pass
    proc.wait()
