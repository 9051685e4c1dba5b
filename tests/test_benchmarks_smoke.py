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

import numpy as np
import pytest

import minseg
from benchmarks.cases import layer_specs, op_specs, unet_conv_layers
from benchmarks.train import TRAIN_SIZES
from tests import background

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
    for line in ("CPU ", "threads ", "native pool", "FP32 peak ", "bandwidth "):
        assert line in stdout, f"header line {line!r} missing"
    # the machine's limits are measured, and every row with a FLOP (byte) count is a % of them
    limits = report["limits"]
    assert limits["fp32_peak"]["gflops"] > 0 and limits["bandwidth"]["gbytes_per_s"] > 0
    assert "SGEMM" in limits["fp32_peak"]["basis"]
    for entry in report["cases"]:
        for r in entry["results"].values():
            if entry["flops"]:
                assert r["pct_peak"] == pytest.approx(100 * r["gflops"] / limits["fp32_peak"]["gflops"])
            if entry["nbytes"]:
                assert r["pct_bandwidth"] == pytest.approx(100 * r["gbytes_per_s"] / limits["bandwidth"]["gbytes_per_s"])
            if entry["flops"] and entry["nbytes"]:  # the roofline: the lower of the two limits for this many FLOPs per byte
                bound = min(limits["fp32_peak"]["gflops"], entry["flops"] / entry["nbytes"] * limits["bandwidth"]["gbytes_per_s"])
                assert r["pct_bound"] == pytest.approx(100 * r["gflops"] / bound)
                assert r["pct_bound"] >= r["pct_peak"]
            else:
                assert r["pct_bound"] is None


def check_plot(path, rows):
    """A PNG that Pillow reads, tall enough for one bar row per timed implementation."""
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        assert width >= 800 and height >= 20 * rows, img.size
        assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 3  # not blank: bars, text


def test_ops_quick(tmp_path):
    path = tmp_path / "ops.json"
    png = tmp_path / "ops.png"
    stdout = run_bench("ops", "--quick", "--repeat", str(REPEAT), "--threads", "1", "--backends", "numpy",
                       "--no-cache-check", "--json", str(path), "--plot", str(png))
    report = json.loads(path.read_text())
    impls = ["numpy"] + (["torch"] if HAS_TORCH else [])
    check_report(report, stdout, [s.name for s in op_specs("quick")], impls)
    check_plot(png, len(report["cases"]) * len(impls))
    # the memory-bound ops have byte counts (a % of bandwidth), the convolutions FLOP counts
    for entry in report["cases"]:
        assert (entry["flops"] is not None) == entry["case"].startswith("conv2d"), entry["case"]
        assert (entry["nbytes"] is not None) == (not entry["case"].startswith("conv2d")), entry["case"]
    assert report["machine"]["threads"]["requested"] == 1
    # every op of issue 4 is there, forward-only and forward+backward convs at both sizes
    names = " ".join(e["case"] for e in report["cases"])
    for op in ("conv2d 3x3 fwd ", "conv2d 3x3 fwd+bwd", "bilinear x2 fwd+bwd", "cross_entropy fwd+bwd", "max_pool2d 2x2 fwd+bwd"):
        assert op in names


def test_ops_quick_times_every_cpu_conv_version(tmp_path):
    """``--only conv2d`` with the cpu backend: a row per numbered CPU conv version that runs some
    function other than the defaults (the 'cpu' row), each computing torch's result (rel err),
    through minseg.functional."""
    cpu = pytest.importorskip("kernels.conv2d.cpu")
    path = tmp_path / "conv.json"
    stdout = run_bench("ops", "--quick", "--only", "conv2d", "--repeat", str(REPEAT), "--threads", "1", "--backends",
                       "cpu", "--no-cache-check", "--json", str(path), timeout=600)
    report = json.loads(path.read_text())
    tables = [(cpu.DEFAULT_FORWARD_VERSION, cpu.FORWARD_VERSIONS), (cpu.DEFAULT_GRAD_INPUT_VERSION, cpu.GRAD_INPUT_VERSIONS),
              (cpu.DEFAULT_GRAD_WEIGHT_VERSION, cpu.GRAD_WEIGHT_VERSIONS)]
    versions = set().union(*(table for _, table in tables))
    assert len(versions) >= 3
    extra = [f"cpu v{v}" for v in sorted(versions) if any(v in table and v != default for default, table in tables)]
    impls = ["cpu", *extra] + (["torch"] if HAS_TORCH else [])
    check_report(report, stdout, [s.name for s in op_specs("quick") if s.name.startswith("conv2d")], impls)
    assert "conv2d 'cpu' = defaults forward v" in stdout


@pytest.mark.parametrize("size", ["quick", "full"])
def test_unet_conv_layers_are_the_models(size):
    """The layer list that ``ops --layers`` times is the benchmark U-Net's: the same conv weights, in
    the same order, and the input sizes its forward gives them (recorded where every conv2d layer is
    checked, F.conv2d's and those of F.conv2d_batch_norm_layers, which Sequential runs for its double convs)."""
    from minseg.nn import UNet

    s = TRAIN_SIZES[size]
    config = {k: s[k] for k in ("in_channels", "num_classes", "base_channels", "depth")}
    with minseg.backend.using("numpy"):
        model = UNet(**config)
    seen = []
    checked = minseg.functional._conv2d_layer

    def recording(shape, dtype, w, bias, *args, **kwargs):
        seen.append((*shape, w.shape[0], w.shape[-1], bias is not None))
        return checked(shape, dtype, w, bias, *args, **kwargs)

    x = minseg.Tensor(np.zeros((s["batch"], s["in_channels"], 8, 8), np.float32))  # small images: only the channels
    mp = pytest.MonkeyPatch()
    mp.setattr(minseg.functional, "_conv2d_layer", recording)
    try:
        with minseg.backend.using("numpy"), minseg.no_grad():
            model(x)
    finally:
        mp.undo()
    layers = unet_conv_layers(size)
    assert [(n, c, co, k) for n, c, _, _, co, k in layers] == [(n, c, co, k) for n, c, _, _, co, k, _ in seen]
    weights = [v.shape for v in model.state_dict().values() if len(v.shape) == 4]
    assert [(co, c, k, k) for _, c, _, _, co, k in layers] == weights
    assert [h for _, _, h, _, _, _ in layers] == [s["image"] * h // 8 for _, _, h, _, _, _, _ in seen]
    # the timed cases have a bias where the model's conv has one (the head), and only there
    assert [spec.inputs["b"] is not None for spec in layer_specs(size)] == [bias for *_, bias in seen]


def test_ops_layers_quick(tmp_path):
    """``ops --layers``: every U-Net conv layer timed with the cpu backend (and torch), with its FLOPs."""
    path = tmp_path / "layers.json"
    stdout = run_bench("ops", "--quick", "--layers", "--repeat", str(REPEAT), "--threads", "1", "--backends", "cpu",
                       "--no-cache-check", "--json", str(path))
    report = json.loads(path.read_text())
    check_report(report, stdout, [s.name for s in layer_specs("quick")], ["cpu"] + (["torch"] if HAS_TORCH else []))
    assert all(entry["flops"] and entry["nbytes"] for entry in report["cases"])
    assert "% bound" in stdout


@pytest.mark.parametrize("argv", [["ops", "--layers", "--quick"], ["ops", "--only", "conv2d,bilinear"],
                                  ["train", "--conv-versions", "1,5", "--quick"], ["ops"]])
def test_cache_check_child_times_the_same_cases(argv):
    """The cache check's second process must run this run's cases: a first run of ``ops --layers`` once
    checked the op cases instead (their kernels were not compiled yet: a false 'RECOMPILED')."""
    from benchmarks.__main__ import cache_check_command, parse_args

    args = parse_args(argv)
    args.threads = 2
    cmd = cache_check_command(args, "first_calls.json")
    assert cmd[:3] == [sys.executable, "-m", "benchmarks"]
    child = parse_args(cmd[3:])
    assert child.first_call_only and child.backends == ["cpu"] and child.no_torch and child.json == "first_calls.json"
    for name in ("mode", "quick", "only", "layers", "conv_versions", "threads"):
        assert getattr(child, name) == getattr(args, name), name


def test_train_quick():
    """``train --quick`` on the numpy backend, and (one run: each run measures the machine first) with
    ``--conv-versions 1`` on the cpu backend: the step also runs with every conv kernel at version 1
    ('cpu v1') and recorded and replayed ('cpu captured'), computing torch's loss, with its own memory
    (a child process) and kernel-time split.
    The command runs in the background from the start of the suite (tests/background.py)."""
    cpu = importlib.util.find_spec("numba") is not None
    run = background.result("train-quick")
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    stdout, path, png = run.stdout, run.outdir / "train.json", run.outdir / "train.png"
    report = json.loads(path.read_text())
    impls = ["numpy"] + (["cpu", "cpu v1", "cpu captured"] if cpu else []) + (["torch"] if HAS_TORCH else [])
    (entry,) = report["cases"]
    check_report(report, stdout, [entry["case"]], impls)
    check_plot(png, 2 * len(impls) - HAS_TORCH)  # the table's rows, and the split of minseg's steps below them
    from PIL import Image

    from benchmarks.plot import SPLIT_COLORS

    with Image.open(png) as img:  # the split bars are drawn: every part's colour is there
        drawn = {color for _, color in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    parts = ["kernels", "outside kernels"] + (["compiled kernels", "kernels' Python host code"] if cpu else [])
    assert all(SPLIT_COLORS[part] in drawn for part in parts), [part for part in parts if SPLIT_COLORS[part] not in drawn]
    # memory of every implementation (each in its own process), and minseg's time outside kernels
    profile = report["step_profile"]
    assert sorted(profile) == sorted(impls)
    for name, p in profile.items():
        assert "error" not in p, p
        if p["peak_rss_mib"] is not None:  # Linux
            assert p["peak_rss_mib"] >= p["base_mib"] > 0 and p["step_mib"] == pytest.approx(p["peak_rss_mib"] - p["base_mib"])
        assert f"step profile [{name}]" in stdout
    numpy = profile["numpy"]
    assert numpy["kernel_calls"] > 0 and 0 < numpy["kernel_s"] < numpy["step_s"]
    assert numpy["outside_s"] == pytest.approx(numpy["step_s"] - numpy["kernel_s"])
    assert numpy["outside_pct"] == pytest.approx(100 * numpy["outside_s"] / numpy["step_s"])
    # the timing wrappers' own cost, measured with a second layer: >= 0, and 'outside' less it
    assert 0 <= numpy["wrapper_s"] and numpy["outside_net_s"] == pytest.approx(numpy["outside_s"] - numpy["wrapper_s"])
    assert "without the timing wrappers' own" in stdout
    # where the time inside goes: every kernel function the step called, slowest first, calls adding up
    kernels = numpy["kernels"]
    assert set(kernels) <= set(minseg.backend.load("numpy").functions) and "conv2d_forward" in kernels
    assert sum(k["calls"] for k in kernels.values()) == numpy["kernel_calls"]
    times = [k["s"] for k in kernels.values()]
    assert times == sorted(times, reverse=True) and 0 < sum(times) < numpy["step_s"]
    assert f"step profile [numpy] inside kernels, ms per step (median of {REPEAT}): {next(iter(kernels))} " in stdout
    model = report["model"]
    size = TRAIN_SIZES["quick"]
    assert model["channels"] == "-".join(str(size["base_channels"] * 2**i) for i in range(size["depth"] + 1))
    # same architecture: equal parameter counts (the torch twin also loaded minseg's state_dict strictly)
    assert len(set(model["params"].values())) == 1 and sorted(model["params"]) == sorted(impls)
    assert "compiled_s" not in numpy  # the numpy backend has no compiled code
    if cpu:
        assert "error" not in profile["cpu v1"] and profile["cpu v1"]["kernel_calls"] == profile["cpu"]["kernel_calls"] > 0
        # the cpu backend's kernel functions: compiled code and the host code around it split 'inside'
        for name in ("cpu", "cpu v1"):
            p = profile[name]
            assert p["compiled_calls"] > 0 and 0 < p["compiled_s"] <= p["kernel_s"]
            assert p["host_s"] == pytest.approx(p["kernel_s"] - p["compiled_s"])
            assert p["host_pct"] == pytest.approx(100 * p["host_s"] / p["step_s"])
        assert "in compiled (Numba) code" in stdout
        # the same step recorded and replayed (minseg/capture.py): the same compiled calls, nothing else inside
        captured = profile["cpu captured"]
        assert "capture_error" not in captured and captured["replays"] >= REPEAT
        assert captured["compiled_calls"] == profile["cpu"]["compiled_calls"]
        assert 0 < captured["compiled_s"] < captured["step_s"]
        assert captured["outside_s"] == pytest.approx(captured["step_s"] - captured["compiled_s"])
        assert "replayed step (median of" in stdout


def test_gpu_mode_without_gpu_exits_cleanly():
    from minseg.backend import cuda_status

    if cuda_status() == "gpu":
        pytest.skip("a real GPU is present: this test is for the no-GPU path")
    stdout = run_bench("gpu", "--quick")
    assert stdout.startswith("no GPU")


def test_bad_conv_versions_are_refused():
    env = dict(os.environ, PYTHONPATH=ROOT)
    for value, message in (("x", "comma-separated integers"), ("99", "the CPU conv versions are")):
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "train", "--quick", "--backends", "cpu", "--no-torch",
                               "--conv-versions", value, "--no-cache-check"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_plot_shows_the_limit_that_bounds_each_case():
    """The right panel's percentage: of the peak where the roofline's bound is the peak, of the bound where
    it is the bandwidth's (a memory-bound conv, the 1x1 head), of the bandwidth for byte-only cases."""
    from benchmarks.plot import _rows

    def entry(case, peak, bw, bound):
        return {"case": case, "results": {"cpu": dict(ratio_vs_torch=0.5, pct_peak=peak, pct_bandwidth=bw, pct_bound=bound)}}

    rows = _rows([entry("compute-bound", 50.0, 10.0, 50.0), entry("memory-bound", 5.0, 30.0, 40.0), entry("bytes only", None, 30.0, None)])
    assert [(r[0], r[3], r[4]) for r in rows] == [("compute-bound", 50.0, "% peak"), ("memory-bound", 40.0, "% bound"),
                                                 ("bytes only", 30.0, "% bw")]
