"""``python -m minseg.tour`` and ``minseg tour``: every step runs, checks what it shows, and says so."""
import os
import re
import subprocess
import sys
from pathlib import Path

from minseg.cli import main

ROOT = Path(__file__).resolve().parents[2]

STEP_TITLES = [
    "[1/8] A Tensor and the graph it records",
    "[2/8] One Function's forward and backward",
    "[3/8] The backend dispatch",
    "[4/8] One conv2d, three implementations",
    "[5/8] The backward's walk",
    "[6/8] A segmentation map",
    "[7/8] gradcheck",
    "[8/8] The autograd graph",
]
KEY_LINES = [
    "ok: cpu.py agrees with reference.py",
    "ok: cuda.py v1 agrees with reference.py",
    "ok: cuda.py v2 agrees with reference.py",
    # the backward's order on the encoder-decoder: loss first, the skip's consumers before e's maker
    "CrossEntropyFunction -> Conv2dFunction -> CatFunction -> InterpolateFunction -> ReLUFunction"
    " -> Conv2dFunction -> MaxPool2dFunction -> ReLUFunction -> Conv2dFunction",
    "ok: softmax over dim 1: every pixel's 4 probabilities sum to 1",
    "ok: autograd's gradient of the logits = (p - onehot) / pixels",
    "ok: gradcheck rejects it",
    "ok: the three weights are leaves that require grad (blue)",
]


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(changes)
    return env


def _check_output(out: str, graph_dir: Path):
    for line in STEP_TITLES + KEY_LINES:
        assert line in out, f"missing from the tour's output: {line!r}"
    assert "read next:" in out and out.count("read next:") == len(STEP_TITLES)
    finished = re.search(r"tour finished: (\d+) checks passed", out)
    assert finished, out[-2000:]
    assert int(finished.group(1)) == out.count("    ok: ") >= 27  # every check printed its line
    dot = (graph_dir / "encoder_decoder_graph.dot").read_text()
    # one box per Function of the encoder-decoder: 3 conv, 2 relu, max-pool, interpolate, cat, cross-entropy
    assert dot.startswith("digraph autograd {") and dot.count("shape=box") == 9


def test_python_m_minseg_tour_runs_every_step(tmp_path):
    # A fresh process without NUMBA_ENABLE_CUDASIM: the tour turns the simulator on itself.
    done = subprocess.run(
        [sys.executable, "-m", "minseg.tour", "--out", str(tmp_path)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_output(done.stdout, tmp_path)
    assert "under the CUDA simulator in this process" in done.stdout


def test_minseg_tour_subcommand(tmp_path, capsys):
    # In this process numba is already imported with the simulator on (tests/conftest.py).
    assert main(["tour", "--out", str(tmp_path)]) == 0
    _check_output(capsys.readouterr().out, tmp_path)


def test_cuda_step_moves_to_a_subprocess_when_numba_runs_without_the_simulator():
    code = (
        "import numba\n"
        "assert not numba.config.ENABLE_CUDASIM\n"
        "from minseg.tour import Tour, step_kernels\n"
        "step_kernels(Tour())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(NUMBA_ENABLE_CUDASIM="0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "in a subprocess (numba was imported here without the simulator)" in done.stdout
    for line in KEY_LINES[:3]:
        assert line in done.stdout
