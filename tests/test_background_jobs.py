"""tests/background.py starts each job in the tests' own session (where its nice value counts
against them), in a process group of its own (which ending the job kills whole), at the job's nice."""
import os
import subprocess
import sys

import pytest

from tests import background

REPORT = "import os; print(os.getsid(0), os.getpgid(0), os.getpid(), os.nice(0))"


@pytest.mark.parametrize("name", sorted(background.JOBS))
def test_a_job_runs_in_the_tests_session_in_its_own_group_at_its_nice(name):
    nice = background.JOBS[name].nice
    out = subprocess.run([sys.executable, "-c", REPORT], preexec_fn=lambda: background._own_group(nice),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    sid, pgid, pid, niceness = map(int, out.split())
    assert sid == os.getsid(0), "a session of its own: Linux's autogroup would ignore its nice value"
    assert pgid == pid != os.getpgid(0)
    assert niceness == min(os.nice(0) + nice, 19)

