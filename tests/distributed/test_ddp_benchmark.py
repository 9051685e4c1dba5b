"""``python -m benchmarks ddp --quick`` runs end to end (plumbing only: no timing is checked)."""
import json
import subprocess
import sys

from tests.distributed.mpi import HAVE_MPI4PY, MPIEXEC, ROOT, explain, rank_env


def test_ddp_benchmark_quick(tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "ddp", "--quick", "--repeat", "1", "--warmup", "1",
                           "--json", str(out)], cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, explain(proc)
    report = json.loads(out.read_text())
    assert report["summaries"]["1"]["step_s"] > 0 and report["summaries"]["1"]["allreduce_s"] == 0
    if not (HAVE_MPI4PY and MPIEXEC):
        assert "skipped      world 2" in proc.stdout
        return
    two = report["runs"]["2"]
    assert two["params"] == report["runs"]["1"]["params"]
    # Every gradient byte goes through a timed bucket all-reduce once per step.
    assert sum(two["bucket_bytes"]) == 4 * two["params"]  # float32
    assert all(len(step["buckets"]) == len(two["bucket_bytes"]) for step in two["steps"])
    rows = report["cost_model"]["rows"]
    assert [(r["machines"], r["gbit_s"]) for r in rows] == [(8, 10), (8, 100), (64, 10), (64, 100)]
    r = rows[0]  # 2 (W-1)/W bytes over 10 Gbit/s
    assert r["allreduce_s"] == 2 * 7 / 8 * report["cost_model"]["bytes"] / 1.25e9
    for line in ("all-reduce/step", "cost model", "speed-up world 2 / world 1"):
        assert line in proc.stdout, explain(proc)
