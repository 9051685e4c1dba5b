"""The benchmark suite runs: ``python -m benchmarks ... --quick`` in a subprocess, as a user would.

Quick mode times tiny shapes twice, so this checks the plumbing (every case
built, timed, compared, printed and written to JSON), never speed. One thread
keeps it fast on a busy machine. Where torch is installed, its outputs are the
reference, so a benchmark that timed a different computation than torch's fails here.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks.cases import op_specs
from benchmarks.train import TRAIN_SIZES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None
REPEAT = 2
# Float32 evaluations of the same function differ by rounding only: ~1e-7 relative.
REL_ERR = 1e-4


def run_bench(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def check_report(report, stdout, names, impls):
    assert [e["case"] for e in report["cases"]] == names
    for entry in report["cases"]:
        assert entry["case"] in stdout, f"{entry['case']!r} missing from the table"
        assert sorted(entry["results"]) == sorted(impls), (entry["case"], entry["results"].keys(), entry["skipped"])
        for impl, r in entry["results"].items():
            assert len(r["times_s"]) == REPEAT and all(t > 0 for t in r["times_s"]), (entry["case"], impl)
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            assert r["rel_err"] <= REL_ERR, (entry["case"], impl, r["rel_err"])
            if "torch" in impls:
                assert r["ratio_vs_torch"] == pytest.approx(r["median_s"] / entry["results"]["torch"]["median_s"])
        if entry["flops"]:
            assert all(r["gflops"] > 0 for r in entry["results"].values())
    for line in ("CPU ", "threads ", "native pool"):
        assert line in stdout, f"header line {line!r} missing"


def test_ops_quick(tmp_path):
    path = tmp_path / "ops.json"
    stdout = run_bench("ops", "--quick", "--repeat", str(REPEAT), "--threads", "1", "--backends", "numpy",
                       "--no-cache-check", "--json", str(path))
    report = json.loads(path.read_text())
    impls = ["numpy"] + (["torch"] if HAS_TORCH else [])
    check_report(report, stdout, [s.name for s in op_specs("quick")], impls)
    assert report["machine"]["threads"]["requested"] == 1
    # every op of issue 4 is there, forward-only and forward+backward convs at both sizes
    names = " ".join(e["case"] for e in report["cases"])
    for op in ("conv2d 3x3 fwd ", "conv2d 3x3 fwd+bwd", "bilinear x2 fwd+bwd", "cross_entropy fwd+bwd", "max_pool2d 2x2 fwd+bwd"):
        assert op in names


def test_train_quick(tmp_path):
    path = tmp_path / "train.json"
    stdout = run_bench("train", "--quick", "--repeat", str(REPEAT), "--threads", "1", "--backends", "numpy",
                       "--no-cache-check", "--json", str(path))
    report = json.loads(path.read_text())
    impls = ["numpy"] + (["torch"] if HAS_TORCH else [])
    (entry,) = report["cases"]
    check_report(report, stdout, [entry["case"]], impls)
    model = report["model"]
    size = TRAIN_SIZES["quick"]
    assert model["channels"] == "-".join(str(size["base_channels"] * 2**i) for i in range(size["depth"] + 1))
    # same architecture: equal parameter counts (the torch twin also loaded minseg's state_dict strictly)
    assert len(set(model["params"].values())) == 1 and sorted(model["params"]) == sorted(impls)


def test_gpu_mode_without_gpu_exits_cleanly():
    from minseg.backend import cuda_status

    if cuda_status() == "gpu":
        pytest.skip("a real GPU is present: this test is for the no-GPU path")
    stdout = run_bench("gpu", "--quick")
    assert stdout.startswith("no GPU")
