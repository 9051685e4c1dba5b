"""``python -m benchmarks gpu --all OUTDIR`` cannot fail on a GPU for a reason a CPU run could show.

A GPU is lent for minutes; the one command that uses it must not die of a typo,
a wrong import, a wrong argument order or a missing key. ``--simulate`` runs the
whole command -- every section, every kernel version against torch, the
subprocesses -- under Numba's CUDA simulator on tiny shapes, and this test checks
what it wrote: JSON that parses, every section done, every discovered kernel
version timed and equal to torch, only GPU-only calls skipped, and a Markdown
table with every section.
"""
import importlib.util
import json
import os
import types

import pytest

from benchmarks import gpu
from tests import background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kernels and torch compute the same float32 sums in other orders: ~1e-7 relative.
REL_ERR = 1e-4
# torch is the peer, not a dependency: without it (the README's test command alone) the command
# still times every kernel version and records the peer as skipped; the comparisons need it.
HAVE_TORCH = importlib.util.find_spec("torch") is not None
NO_PEER = "torch is not installed"


@pytest.fixture(scope="module")
def simulated_run():
    run = background.result("gpu-simulate")  # started when the suite was collected (tests/background.py)
    outdir = run.outdir
    report = json.loads((outdir / "gpu.json").read_text())
    return run, report, (outdir / "gpu.md").read_text(), outdir


def test_every_section_runs(simulated_run):
    proc, report, _, outdir = simulated_run
    errors = {name: s.get("traceback", s.get("error")) for name, s in report["sections"].items() if s["status"] != "done"}
    assert not errors, f"sections failed: {errors}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["mode"] == "simulate"
    assert len(report["cpu_cores"]) == (1 if hasattr(os, "sched_setaffinity") else 0)  # the simulator on one core
    tests = report["sections"]["tests"]["summary"]
    assert tests["passed"] > 0 and tests["passed"] == tests["tests"], tests
    assert (outdir / "cuda_tests.log").exists() and (outdir / "cuda_tests.xml").exists()
    copy = report["sections"]["copy"]
    assert copy["ceiling_gbytes_per_s"] > 0


def _only_gpu_skips(skipped: dict):
    """The skips a CPU run must not have: neither GPU-only calls nor, where torch is absent, the peer."""
    return {impl: why for impl, why in skipped.items()
            if gpu.SKIP_ON_SIMULATOR not in why and (HAVE_TORCH or NO_PEER not in why)}


def test_every_kernel_version_is_timed_and_matches_torch(simulated_run):
    _, report, _, _ = simulated_run
    section = report["sections"]["kernels"]
    assert section["problems"] == []
    cases = section["cases"]
    assert len(cases) == section["planned"] and section["only"] is None
    for entry in cases + report["sections"]["train"]["cases"]:
        assert not _only_gpu_skips(entry["skipped"]), (entry["case"], entry["skipped"])
        assert ("torch" in entry["results"]) == HAVE_TORCH, entry["case"]
        for impl, r in entry["results"].items():
            assert r["median_s"] > 0 and r["repeats"] >= 1, (entry["case"], impl)
            if HAVE_TORCH:
                assert r["rel_err"] <= REL_ERR, (entry["case"], impl, r["rel_err"])
    # versions are discovered: one row per entry of every *_VERSIONS dict
    from kernels.conv2d import cuda as conv

    for attr, kind in (("FORWARD_VERSIONS", "forward"), ("GRAD_WEIGHT_VERSIONS", "grad_weight")):
        rows = {impl for e in cases if f"conv2d 3x3 {kind} " in e["case"] for impl in e["results"]}
        assert {r.split(" (")[0] for r in rows if r.startswith("cuda")} == {f"cuda v{k}" for k in getattr(conv, attr)}
    names = " ".join(e["case"] for e in cases)
    for op in ("relu forward", "relu backward", "batch_norm stats", "batch_norm backward", "max_pool2d 2x2 backward",
               "bilinear x2 forward", "bilinear x2 backward", "cross_entropy fwd+bwd", "conv2d grad_bias",
               "cat channels forward", "cat channels backward"):
        assert op in names


def test_launch_paths_and_markdown(simulated_run):
    _, report, md, _ = simulated_run
    launches = report["sections"]["launch"]["cases"]
    assert {c["arrays"] for c in launches} == {1, 4}
    assert all(c["host_us"] > 0 for c in launches if "skipped" not in c)
    for heading in ("## Machine", "## CUDA tests (simulator off)", "## Copy bandwidth", "## Launch overhead",
                    "## Kernels", "## U-Net training step"):
        assert heading in md
    assert "| conv2d 3x3 forward" in md and "| unet train step" in md
    targets = md[md.index("## Issue 8's targets"):]
    lines = ["of the copy bandwidth (target >= 80%)", "of the copy bandwidth (target >= 60%)"]
    if HAVE_TORCH:  # the ratios to cuDNN and torch need the peer
        lines += ["of cuDNN (target >= 50%", "forward+backward", "x torch CUDA (target <= 2x)"]
    for line in lines:
        assert line in targets, line


def test_versions_dicts_belong_to_one_function():
    """FORWARD_VERSIONS -> conv2d_forward; a dict that names no timed function is reported, never skipped silently."""
    module = types.SimpleNamespace(
        __name__="fake", conv2d_forward=lambda x, version=1: (x, version), conv2d_grad_bias=lambda gy: gy,
        FORWARD_VERSIONS={1: None, 3: None}, DEFAULT_FORWARD_VERSION=3, SHUFFLE_VERSIONS={1: None},
    )
    versions, problems = gpu.kernel_versions(module, ["conv2d_forward", "conv2d_grad_bias"])
    assert list(versions["conv2d_forward"]) == ["cuda v1", "cuda v3 (default)"]
    assert versions["conv2d_forward"]["cuda v3 (default)"]("x") == ("x", 3)
    assert list(versions["conv2d_grad_bias"]) == ["cuda"]
    assert len(problems) == 1 and "SHUFFLE_VERSIONS" in problems[0]


def test_clock_from_nvidia_smi():
    """CUDA 13 runtimes no longer report the SM clock: the FP32 peak estimate reads nvidia-smi's CSV."""
    csv = ("name, driver_version, clocks.sm [MHz], clocks.max.sm [MHz]\n"
           "NVIDIA H100 80GB HBM3, 580.65.06, 345 MHz, 1980 MHz\n")
    assert gpu.smi_field(csv, "clocks.max.sm") == 1980.0
    assert gpu.smi_field(csv, "clocks.sm") == 345.0
    assert gpu.smi_field(csv, "power.limit") is None
    assert gpu.smi_field("nvidia-smi not found", "clocks.max.sm") is None
