"""Test set-up shared by every test.

* CUDA kernels run under Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0 is
  set explicitly (do that on a machine with a GPU). The variable must be set
  before numba is first imported, which is why it sits at the very top here.
* Hypothesis profiles: ``ci`` (default) has no deadline, since the first call of a
  Numba kernel compiles it, and few examples so the suite stays fast; ``dev``
  explores more (200 examples by default, and 10x every test's own count). Choose with
  HYPOTHESIS_PROFILE=dev. A failing example prints its
  reproduction blob (``@reproduce_failure``) and the seed.
"""
import contextlib
import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if os.environ["NUMBA_ENABLE_CUDASIM"] == "1":
    # Each simulated CUDA thread is a Python thread; a short switch interval makes
    # kernels that call syncthreads() ~8x faster.
    sys.setswitchinterval(5e-5)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from minseg import runtime  # noqa: E402

# Tests call kernels/<op>/cuda.py directly, not only through backend.load: apply the
# simulator fixes up front (minseg/runtime.py says what it fixes).
runtime.fix_simulator_shared_arrays()
runtime.simulate_warp_shuffles()

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
# A test's own @settings(max_examples=N) overrides the profile's count, and most tests set one
# (sized for the ci run), so the dev profile multiplies those counts too.
DEV_EXAMPLES_FACTOR = 10


def pytest_collection_modifyitems(config, items):
    if PROFILE == "dev":
        _scale_examples(items)
    _background_readers_last(items)


# Tests that start Python subprocesses which train or benchmark (MPI ranks, the CLI, the benchmark
# commands): each subprocess loads the Numba kernels from the on-disk cache, or compiles them when
# the cache is cold (a fresh clone: CI). They run after the in-process tests, which fill the cache.
SUBPROCESS_TESTS = ("tests/distributed/", "tests/e2e/", "tests/test_benchmarks_smoke.py")


def _background_readers_last(items):
    """The subprocess tests run after the others (a warm Numba cache), and the tests that read a
    background job's output last of all, when the job (started as the run begins, on the other
    core) has had the whole run to finish instead of being waited for."""
    from tests import background

    readers = tuple(job.tests for job in background.JOBS.values() if job.read)
    # stable: within each group the tests keep their order
    items.sort(key=lambda item: 2 if item.nodeid.startswith(readers) else int(item.nodeid.startswith(SUBPROCESS_TESTS)))


def pytest_collection_finish(session):
    # after -k / -m deselection: only the jobs of the tests that will run
    _start_background_jobs(session.config, session.items)


def _scale_examples(items):
    scaled = set()
    for item in items:
        test = getattr(item, "obj", None)
        # where @given keeps the test's settings, read when the test runs (hypothesis internals, stable for years)
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if own is None or id(test) in scaled or own.max_examples == settings.default.max_examples:
            continue
        scaled.add(id(test))  # parametrized items share one function: scale it once
        test._hypothesis_internal_use_settings = settings(own, max_examples=own.max_examples * DEV_EXAMPLES_FACTOR)


def _start_background_jobs(config, items):
    """Start the background jobs (tests/background.py) whose tests are about to run."""
    from tests import background

    if hasattr(config, "workerinput") or os.environ.get(background.NO_JOBS):  # an xdist worker, or a job's own pytest
        return
    wanted = {name for name, job in background.JOBS.items() for item in items
              if item.nodeid.startswith(job.tests) and len(items) >= job.min_tests}
    for name in sorted(wanted):
        background.start(name)


# Under the simulator every CUDA thread is a Python thread: a property test's cuda row costs
# 10-50x its numpy/cpu rows. tests/cuda/ draws its own problems for every kernel's edges, so the
# cuda rows of the shared property and oracle tests (tests/kernels, tests/oracle) run a third
# of the test's draws; explicit @examples always run. On a GPU (NUMBA_ENABLE_CUDASIM=0) they
# run in full.
CUDA_SIMULATOR_DRAWS = 1 / 3


# the cores this process may use, as it started (the simulated tests run on one of them: _one_core)
CORES = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def simulator_core() -> int | None:
    """The core the simulated tests of this process run on: the first, or under pytest-xdist worker
    gwK's K-th (so that workers do not share one); None on a machine of one core."""
    if len(CORES) < 2:
        return None
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    k = int(worker[2:]) if worker[2:].isdigit() else 0
    return sorted(CORES)[k % len(CORES)]


def _cuda_row(item) -> bool:
    """Whether the test is the cuda row of a test parametrized over backends."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "cuda" in callspec.id.split("-")


@contextlib.contextmanager
def _one_core():
    """Run the simulator's threads on one core. A launch is a Python thread per CUDA thread, all taking
    turns at the GIL; spread over both cores, each hand-over wakes a thread on the other core, and a
    background job there (tests/background.py) delays every wake-up. Pinned to one core, a cuda row of
    tests/kernels/test_batch_norm.py ran in 2.3-3.3 s instead of 4.2-4.6 s alone and 8.6 s beside a
    busy process, and the whole suite in 3:31 instead of 4:35 on a warm Numba cache, 5:42 and 7:52
    instead of 6:21 and 8:25 on a cold one (a fresh clone, two pairs of runs hours apart: this VM's
    speed drifts; the 2-core machine, 2026-11-27).
    Threads inherit the mask of the thread that starts them (the simulator's, and Numba's OpenMP
    workers if a cpu kernel first runs here), so on the way out every thread of the process gets all
    the cores back.

    Tried and dropped: keeping the background jobs off this core (the job that compiles the cpu
    kernels ahead of the tests then fell behind: 5:58-6:15 cold), and running the simulated tests
    after the rest (they no longer covered that job's head start: 7:55)."""
    cores, core = set(CORES), simulator_core()
    if core is None:  # one core (or no affinity calls: CORES is empty)
        yield
        return
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:  # a thread that has ended meanwhile
                pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    cuda_row = _cuda_row(item)
    # the tests that run CUDA kernels under the simulator: a cuda row, or a test of tests/cuda/
    if os.environ["NUMBA_ENABLE_CUDASIM"] != "1" or not (cuda_row or item.nodeid.startswith("tests/cuda/")):
        yield
        return
    test = getattr(item, "obj", None)
    own = getattr(test, "_hypothesis_internal_use_settings", None)
    with _one_core():
        if own is None or not cuda_row or PROFILE == "dev":
            yield
            return
        test._hypothesis_internal_use_settings = settings(own, max_examples=max(1, round(own.max_examples * CUDA_SIMULATOR_DRAWS)))
        try:
            yield
        finally:
            test._hypothesis_internal_use_settings = own


def pytest_sessionfinish(session, exitstatus):
    from tests import background

    background.stop_all()
