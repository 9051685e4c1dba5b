"""Long subprocesses that some tests check, started as soon as pytest knows they will be needed.

The suite runs serially on one core; a subprocess that only produces a report (the PTX
compile of every CUDA kernel, the simulated GPU command, the training-step benchmark) can
run on the machine's other core meanwhile. The jobs run at the lowest CPU priority (nice
19), so they use only what the tests leave: the PTX compile alone starts a process per
compute capability, which at equal priority took half of the tests' core too.
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
    # Only for a run of most of the suite: a run of a few files gives it no head start.
    "numba-warm": Job(("-m", "pytest", "-q", "-p", "no:cacheprovider", *WARM_FILES, "-k", "cpu"),
                      (("PYTHONPATH", str(ROOT)), (NO_JOBS, "1")), "tests/kernels/", 900, read=False, min_tests=500),
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
    # a session of its own: ending the job ends the subprocesses it starts too (ptx_report's workers)
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, **dict(job.env)), stdout=out, stderr=err, text=True,
                            start_new_session=True, preexec_fn=_lowest_priority)
    _running[name] = (proc, out, err, outdir)


def _lowest_priority() -> None:
    """Run in the job's process before it starts: nice 19, inherited by its subprocesses."""
    os.nice(19)


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
    """End a job and every process of its session (its own subprocesses, even after it ended)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has ended already
        pass
    proc.wait()
