"""tests/background.py starts each job in the tests' own session (where its nice value counts
against them), in a process group of its own (which ending the job kills whole), at the job's nice."""
import os

import pytest

from tests import background

REPORT = "import os; print(os.getsid(0), os.getpgid(0), os.getpid(), os.nice(0))"


@pytest.mark.parametrize("nice", sorted({0, 19} | {job.nice for job in background.JOBS.values()}))
def test_a_job_runs_in_the_tests_session_in_its_own_group_at_its_nice(nice, monkeypatch):
    monkeypatch.setattr(background, "_running", {})  # the suite's own jobs stay as they are
    monkeypatch.setitem(background.JOBS, "probe", background.Job(("-c", REPORT), (), "", 60, nice=nice))
    run = background.result("probe")
    for file in background._running["probe"][1:3]:  # its stdout and stderr
        file.close()
    assert run.returncode == 0, run.stderr
    sid, pgid, pid, niceness = map(int, run.stdout.split())
    assert sid == os.getsid(0), "a session of its own: Linux's autogroup would ignore its nice value"
    assert pgid == pid != os.getpgid(0)
    assert niceness == min(os.nice(0) + nice, 19)
