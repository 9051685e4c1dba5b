"""Under the CUDA simulator, a test's cuda row runs on one core, and so do the threads it starts (each
simulated CUDA thread is one); its other rows run on every core (tests/conftest.py, ``_one_core``)."""
import os
import threading

import pytest

from kernels import cuda_common as cc
from tests.conftest import CORES, simulator_core

pytestmark = pytest.mark.skipif(len(CORES) < 2 or not cc.SIMULATOR, reason="needs several cores and the CUDA simulator")


def _cores_of_a_new_thread():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_the_cuda_row_runs_on_one_core_the_others_on_every_core(backend):
    expected = {simulator_core()} if backend == "cuda" else set(CORES)
    assert os.sched_getaffinity(0) == expected
    assert _cores_of_a_new_thread() == expected


def test_every_thread_has_every_core_back_after_a_cuda_row():
    """Runs after the rows above (pytest keeps a file's order): no thread of this process is left pinned."""
    for tid in os.listdir("/proc/self/task"):
        try:
            assert os.sched_getaffinity(int(tid)) == set(CORES), tid
        except ProcessLookupError:  # ended meanwhile
            pass
