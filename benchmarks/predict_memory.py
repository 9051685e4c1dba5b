"""Peak memory of ``minseg predict`` on a large image: sliding windows vs one pass.

    python -m benchmarks.predict_memory                 # 4000x3000 image, default U-Net
    python -m benchmarks.predict_memory --quick         # 320x240: checks that it runs
    python -m benchmarks.predict_memory --json out.json

Each run is a fresh ``python -m minseg predict`` process; its peak resident
set size (``ru_maxrss`` of that child, from ``os.wait4``) is what a user would
see. Memory, unlike time, does not depend on what else the machine is doing,
so the numbers hold on a busy machine. The model is the default U-Net
(16-32-64-128) with its initial weights, saved as a checkpoint of a 64-pixel
tile size; weights do not change the memory. The image is a synthetic aerial
scene, tiled up to the requested size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(path: Path, tile: int) -> None:
    from minseg.cli import DEFAULTS, build_model, build_optimizer, save_checkpoint
    from minseg.data.synthetic import CLASSES

    config = dict(DEFAULTS, num_classes=len(CLASSES), classes=list(CLASSES), crop=None, backend=None, tile=[tile, tile])
    model = build_model(config)
    optimizer, schedule = build_optimizer(config, model, steps_per_epoch=1)
    save_checkpoint(path, model, optimizer, schedule, dict(epoch=0, config=config, history=[]))


def make_image(path: Path, width: int, height: int) -> None:
    from PIL import Image

    from minseg.data import make_scene

    scene, _ = make_scene(np.random.default_rng(0), size=500)
    tile = np.clip(np.rint(scene.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
    reps = (-(-height // 500), -(-width // 500), 1)
    Image.fromarray(np.tile(tile, reps)[:height, :width]).save(path)


def peak_rss(argv: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MiB, wall seconds, exit code) of one child process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode:
        print(err, file=sys.stderr)
    return usage.ru_maxrss / 1024, time.perf_counter() - start, proc.returncode  # ru_maxrss is in KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predict_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4000x3000", help="image WIDTHxHEIGHT (default 4000x3000)")
    p.add_argument("--tile", type=int, default=64, help="the checkpoint's training tile size = the default window (default 64)")
    p.add_argument("--window-batch", type=int, default=8, help="windows per forward pass (default 8, minseg predict's default)")
    p.add_argument("--quick", action="store_true", help="a 320x240 image: checks that the benchmark runs")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    width, height = (320, 240) if args.quick else (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "model.npz", args.tile)
        make_image(tmp / "big.png", width, height)
        base = [sys.executable, "-m", "minseg", "predict", str(tmp / "big.png"), "--checkpoint", str(tmp / "model.npz"), "--quiet"]
        runs = {}
        for name, extra in (
            ("sliding", ["--window-batch", str(args.window_batch)]),
            ("one pass", ["--window", "0"]),
        ):
            mib, seconds, code = peak_rss(base + ["--out", str(tmp / name.replace(" ", "_"))] + extra)
            if code:
                print(f"{name}: minseg predict exited with {code}", file=sys.stderr)
                return 1
            outputs = sorted(f.name for f in (tmp / name.replace(" ", "_")).iterdir())
            runs[name] = dict(peak_rss_mib=round(mib, 1), seconds=round(seconds, 1), outputs=outputs)
        image_mib = 3 * width * height * 4 / 2**20
    print(f"minseg predict on a {width}x{height} image (default U-Net, window {args.tile}, overlap 0.25, "
          f"{args.window_batch} windows per batch); the float32 image alone is {image_mib:.0f} MiB")
    print(f"{'mode':<10} {'peak RSS (MiB)':>15} {'wall (s)':>9}")
    for name, r in runs.items():
        print(f"{name:<10} {r['peak_rss_mib']:>15.1f} {r['seconds']:>9.1f}")
    ratio = runs["one pass"]["peak_rss_mib"] / runs["sliding"]["peak_rss_mib"]
    print(f"one pass / sliding: {ratio:.1f}x the peak memory (wall times depend on the machine's load)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(width=width, height=height, tile=args.tile, runs=runs, ratio=ratio), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
