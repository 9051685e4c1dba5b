"""``python -m benchmarks gpu --all OUTDIR``: everything a GPU is needed for, in one run of at most ~6 minutes.

A GPU is lent now and then, for minutes. This command is what runs first on one;
it writes ``OUTDIR/gpu.json`` and ``OUTDIR/gpu.md`` (the same results as Markdown
tables) after *every* case, so a run cut off by a time-out still leaves what it
finished, and prints its progress. Its sections, in order:

1. **machine** -- the card, driver, clocks (nvidia-smi when present), compute
   capability, SMs, L2, and the versions of every package involved.
2. **tests** -- ``python -m pytest tests/cuda`` with ``NUMBA_ENABLE_CUDASIM=0``
   (and ``MINSEG_POISON=1``, NaN-filled fresh outputs) in a subprocess with a
   time limit: every kernel against its NumPy reference on the hardware, on CuPy
   arrays. The log and a JUnit XML go to OUTDIR. (``tests/cuda/test_ptx.py`` is
   left out: CI compiles the PTX without a GPU.)
3. **copy** -- the copy-bandwidth ceiling: a CuPy device-to-device copy
   (``cudaMemcpyAsync``) and a one-thread-per-element Numba copy kernel on 1 GiB,
   bytes read + written per second. The CuPy figure is the 100% of the '% copy'
   column.
4. **launch** -- host microseconds per launch of a trivial kernel (issue 8,
   deliverable 7): Numba with CuPy arguments (DLPack export per argument), Numba
   with Numba device arrays, and the same Numba-compiled code linked to a cubin
   and launched as a CuPy ``RawModule`` kernel; with 1 and with 4 array arguments.
5. **kernels** -- every version of every kernel of ``kernels/<op>/cuda.py`` at
   issue 8's shapes, against torch CUDA. Versions are discovered, not listed
   here: a module attribute ``<STEM>_VERSIONS = {k: fn}`` belongs to the public
   function whose name is ``<stem>`` or ends with ``_<stem>`` (``FORWARD_VERSIONS``
   -> ``conv2d_forward``); a public function without such a dict is its own single
   version. A ``*_VERSIONS`` dict that no case here can time is reported as an
   error (the CPU test below fails on it), so a new version is never silently left
   out. The peer is torch with TF32 off (cuDNN, ``cudnn.benchmark`` on), and for
   convolutions also torch with TF32 on; the kernels cuDNN ran (its algorithm)
   come from ``torch.profiler`` and stand beside the figure.
6. **train** -- a U-Net training step (the benchmark U-Net of ``train.py`` at
   batch 16, 3x128x128) on the cuda backend against torch CUDA, from the same
   weights.

How a case is timed: each implementation is called once (compilation, cuDNN's
algorithm search) and its outputs are compared with torch's (``rel err`` =
||out - torch|| / ||torch||, the worst over the outputs); after a warm-up call,
R back-to-back calls with R chosen so that one loop takes >= 2 ms are bracketed
by two CUDA events on the default stream (where CuPy, Numba and torch launch);
5 such loops, interleaved between the implementations, give the median device
time per call. Memory-bound cases write a buffer twice the L2 size before each
loop, so the loop starts from DRAM. 'host us' is the host's time per call
inside the loop (launch cost; when it exceeds the device time, the case is
launch-bound). GFLOP/s counts 2 FLOPs per multiply-add; GB/s the fewest bytes
the op must read and write; '% cuDNN' is torch's (TF32 off) time over ours;
'% peak' is against an *estimated* FP32 peak (SMs x FP32 lanes per SM x 2 x
the maximum SM clock).

``gpu.md`` ends with issue 8's targets, each with the measured figure of the
fastest version (conv forward and forward+backward as % of cuDNN, the
memory-bound kernels as % of the copy bandwidth, the U-Net step as x torch).

Every section has a time budget (``SECTION_BUDGET_S``; the total stays under
~6 minutes); a case that would start after its section's budget is recorded as
skipped, and a section that raises records the error and the run goes on.

``--sections kernels,train`` runs a subset, ``--only conv2d,bilinear`` only the kernel
cases whose name contains one of the strings, ``--budget S`` scales every section's
budget so that they add up to S seconds.

``--simulate`` runs the same code on a CPU under Numba's CUDA simulator, on tiny
shapes, with NumPy arrays and the host clock instead of CuPy and CUDA events,
torch on the CPU as the peer, and only the calls that need a GPU (TF32, the
CuPy copy and RawModule launch, the L2 flush) skipped and recorded as such.
``tests/test_gpu_command.py`` runs it, so the GPU run cannot fail for a reason
a CPU could have shown.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from numba import cuda

import kernels  # noqa: F401  (restores np.row_stack for numba-cuda on NumPy >= 2.5: kernels/__init__.py)

from . import machine
from .cases import TorchLib, conv_flops, cross_entropy_bytes

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("machine", "tests", "copy", "launch", "kernels", "train")
# Seconds per section on a GPU: 345 s in all, leaving ~15 s for imports and the
# first compilations under the 6-minute limit. 'tests' is a hard limit (the
# subprocess is killed); the others stop starting new cases.
SECTION_BUDGET_S = dict(machine=10, tests=140, copy=10, launch=15, kernels=130, train=40)
SKIP_ON_SIMULATOR = "needs a real GPU (simulator run)"

# Issue 8's shapes: conv 3x3 (N, C_in, H, W, C_out); the memory-bound ops on one
# activation (N, C, H, W); cross-entropy logits (N, classes, H, W).
SHAPES = {
    "gpu": dict(
        conv=[(8, 16, 256, 256, 16), (16, 64, 128, 128, 64), (16, 128, 64, 64, 128)],
        activation=(16, 64, 128, 128),
        cross_entropy=[(16, 4, 256, 256), (16, 19, 256, 256)],
        copy_bytes=1 << 30,
        launches=2000,
        train="gpu",
        tests=["tests/cuda", "--ignore=tests/cuda/test_ptx.py"],
    ),
    # Under the simulator every CUDA thread is a Python thread: a few hundred per launch.
    "simulator": dict(
        conv=[(1, 1, 4, 5, 2)],
        activation=(1, 2, 6, 6),
        cross_entropy=[(1, 3, 5, 6)],
        copy_bytes=1 << 12,
        launches=3,
        train="simulator",
        tests=["tests/cuda/test_relu_cuda.py"],
    ),
}


@dataclass
class Timing:
    warmup: int  # calls after the first, untimed
    samples: int  # timed loops per implementation (median); 0: the first call is the only sample
    min_loop_s: float  # R is chosen so that one loop of R calls takes at least this
    max_repeats: int


GPU_TIMING = Timing(warmup=1, samples=5, min_loop_s=2e-3, max_repeats=1000)
SIMULATOR_TIMING = Timing(warmup=0, samples=1, min_loop_s=0.0, max_repeats=1)
# A simulated U-Net step launches ~100 kernels of Python threads (~10 s on a busy CPU): one call only.
SIMULATOR_TRAIN_TIMING = Timing(warmup=0, samples=0, min_loop_s=0.0, max_repeats=1)


def to_numpy(a) -> np.ndarray:
    """A host copy of a NumPy, CuPy or torch array or a minseg Tensor."""
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("minseg"):
        return a.numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


# ------------------------------------------------------------------ the device


class GPU:
    """CuPy arrays, CUDA events on the default stream, an L2 flush."""

    def __init__(self):
        import cupy

        self.cupy = cupy
        l2 = cupy.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]
        self._flush = cupy.empty(max(2 * l2, 64 << 20) // 4, dtype=cupy.float32)

    def asarray(self, a):
        return self.cupy.asarray(a)

    def sync(self):
        self.cupy.cuda.runtime.deviceSynchronize()

    def flush_l2(self):
        self._flush.fill(0)

    def loop(self, fn: Callable, repeats: int) -> tuple[float, float]:
        """(device seconds per call, host seconds per call) of ``repeats`` back-to-back calls."""
        cupy = self.cupy
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3 / repeats, host / repeats

    def free(self):
        self.cupy.get_default_memory_pool().free_all_blocks()


class Simulator:
    """The CPU stand-in: NumPy arrays, the host clock, no cache to flush."""

    def __init__(self):
        from minseg import runtime

        # The kernels are called directly, not through backend.load: apply the simulator's
        # fixes (thread-safe shared arrays, warp shuffles) that loading the cuda backend would.
        runtime.apply_for("cuda")

    def asarray(self, a):
        return np.asarray(a)

    def sync(self):
        pass

    def flush_l2(self):
        pass

    def loop(self, fn: Callable, repeats: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        seconds = (time.perf_counter() - t0) / repeats
        return seconds, seconds

    def free(self):
        pass


class Peer:
    """torch on the GPU (the CPU under --simulate) with TF32 off unless a call asks for it."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, device
        self.F = torch.nn.functional
        self.lib = TorchLib(device)
        torch.backends.cudnn.benchmark = True
        self.set_tf32(False)

    def set_tf32(self, on: bool):
        self.torch.backends.cudnn.allow_tf32 = on
        self.torch.backends.cuda.matmul.allow_tf32 = on

    def tensor(self, a):
        return self.lib.tensor(a)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def kernel_names(self, fn: Callable) -> list[str]:
        """The GPU kernels (on the CPU: the innermost aten ops) one call of ``fn`` runs, via torch.profiler."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        on_gpu = self.device == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
            fn()
            self.sync()
        events = [e.name for e in prof.events() if on_gpu == (e.device_type == DeviceType.CUDA)]
        if on_gpu and not events:  # torch versions that attach kernels to their launching CPU events only
            events = [k.name for e in prof.events() for k in getattr(e, "kernels", [])]
        names = []
        for name in events:
            name = re.sub(r"^void ", "", name)
            name = re.split(r"[<(]", name)[0]  # drop template arguments and parameters
            if name and name not in names:
                names.append(name)
        # On the CPU (--simulate) the innermost aten ops stand in for the kernels.
        return names if on_gpu else [n for n in names if "conv" in n][-1:] or names[-1:]

    def free(self):
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


# ------------------------------------------------------------------ the report


class Report:
    """Everything measured so far, rewritten to OUTDIR/gpu.json and OUTDIR/gpu.md after every change."""

    def __init__(self, outdir: Path, meta: dict):
        self.outdir = outdir
        self.data = dict(meta, sections={name: dict(status="not run") for name in SECTIONS})

    def section(self, name: str, **fields):
        self.data["sections"][name].update(fields)
        self.save()

    def add_case(self, section: str, entry: dict):
        self.data["sections"][section].setdefault("cases", []).append(entry)
        self.save()

    def save(self):
        try:
            md = markdown(self.data)
        except Exception:  # the JSON is the record; a rendering bug must not stop the run
            md = f"# rendering gpu.md failed\n\n```\n{traceback.format_exc()}\n```\n"
        for name, text in (("gpu.json", json.dumps(self.data, indent=1, default=str)), ("gpu.md", md)):
            tmp = self.outdir / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.outdir / name)


def _fmt(value, spec="{:.3g}", scale=1.0):
    return "-" if value is None else spec.format(value * scale)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"] + [
        "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows
    ]


def case_rows(cases: list[dict]) -> list[list[str]]:
    rows = []
    for e in cases:
        for impl, r in e["results"].items():
            rows.append([
                e["case"], impl, _fmt(r["median_s"], "{:.4g}", 1e3), str(r["repeats"]), _fmt(r["host_s"], "{:.0f}", 1e6),
                _fmt(r.get("gflops")), _fmt(r.get("pct_peak"), "{:.1f}%"), _fmt(r.get("pct_cudnn"), "{:.0f}%"),
                _fmt(r.get("gbytes_per_s")), _fmt(r.get("pct_copy"), "{:.0f}%"), _fmt(r.get("rel_err"), "{:.1e}"),
                " + ".join(r.get("kernels", [])) or "",
            ])
        for impl, why in e.get("skipped", {}).items():
            rows.append([e["case"], impl, f"skipped: {why}"] + [""] * 9)
    return rows


CASE_HEAD = ["case", "impl", "device ms", "R", "host us", "GFLOP/s", "% peak (est.)", "% torch (cuDNN)", "GB/s", "% copy",
             "rel err", "kernels (torch.profiler)"]


def markdown(data: dict) -> str:
    s = data["sections"]
    out = [f"# minseg GPU check: {data['device']}", "",
           f"`{data['command']}`, {data['date_utc']} UTC, mode {data['mode']}. Method: `benchmarks/gpu.py`.", ""]

    def head(name, title):
        sec = s[name]
        status = sec["status"] + (f" in {sec['seconds']:.0f} s" if "seconds" in sec else "")
        out.extend([f"## {title}", "", f"status: {status}" + (f"; error: `{sec['error']}`" if sec.get("error") else ""), ""])
        return sec

    sec = head("machine", "Machine")
    if "info" in sec:
        out += _table(["field", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                           for k, v in sec["info"].items()]) + [""]
    sec = head("tests", "CUDA tests (simulator off)")
    if "summary" in sec:
        out += _table(["tests", "passed", "failed", "errors", "skipped", "log"],
                      [[sec["summary"].get(k, "-") for k in ("tests", "passed", "failures", "errors", "skipped")]
                       + [sec.get("log", "")]]) + [""]
        out += [f"- FAILED {name}" for name in sec["summary"].get("failed", [])] + [""]
    sec = head("copy", "Copy bandwidth")
    out += _table(["copy", "bytes", "device ms", "GB/s (read + write)", "note"],
                  [[c["name"], c["bytes"], _fmt(c["median_s"], "{:.4g}", 1e3), _fmt(c["gbytes_per_s"]), c.get("skipped", "")]
                   for c in sec.get("cases", [])]) + [""]
    sec = head("launch", "Launch overhead")
    out += _table(["launch path", "arrays", "host us / launch", "device us / launch", "note"],
                  [[c["name"], c["arrays"], _fmt(c.get("host_us"), "{:.1f}"), _fmt(c.get("device_us"), "{:.1f}"),
                    c.get("skipped", c.get("note", ""))] for c in sec.get("cases", [])]) + [""]
    sec = head("kernels", "Kernels")
    out += _table(CASE_HEAD, case_rows(sec.get("cases", []))) + [""]
    out += [f"- {line}" for line in sec.get("problems", [])]
    sec = head("train", "U-Net training step")
    out += _table(CASE_HEAD, case_rows(sec.get("cases", []))) + [""]
    if sec.get("model"):
        out += [f"model: {json.dumps(sec['model'])}", ""]
    out += ["## Issue 8's targets", ""] + [f"- {line}" for line in target_lines(data)] + [""]
    return "\n".join(out) + "\n"


# Issue 8's targets for the memory-bound kernels, as % of the copy bandwidth.
COPY_TARGETS = {"cross_entropy": 80, "batch_norm": 60, "max_pool2d": 60, "bilinear": 60, "relu": 60}


def _fastest_cuda(entry: dict):
    """(impl, result) of the fastest minseg version in a case, or None."""
    timed = [(impl, r) for impl, r in entry["results"].items() if impl.startswith("cuda") and "median_s" in r]
    return min(timed, key=lambda item: item[1]["median_s"], default=None)


def target_lines(data: dict) -> list[str]:
    """Each target of issue 8 with the measured figure (fastest minseg version where there are several)."""
    cases = data["sections"]["kernels"].get("cases", [])
    by_name = {e["case"]: e for e in cases}
    lines = []
    for e in cases:
        best = _fastest_cuda(e)
        if best is None:
            continue
        impl, r = best
        if e["case"].startswith("conv2d 3x3 forward") and r.get("pct_cudnn") is not None:
            lines.append(f"{e['case']}: {impl} at {r['pct_cudnn']:.0f}% of cuDNN (target >= 50% at 64 and 128 channels)")
        op = next((k for k in COPY_TARGETS if e["case"].startswith(k)), None)
        if op and r.get("pct_copy") is not None:
            lines.append(f"{e['case']}: {impl} at {r['pct_copy']:.0f}% of the copy bandwidth (target >= {COPY_TARGETS[op]}%)")
    for e in cases:  # forward + backward = forward + grad_input + grad_weight, fastest version of each
        if not e["case"].startswith("conv2d 3x3 forward "):
            continue
        shape = e["case"][len("conv2d 3x3 forward "):]
        parts = [by_name.get(f"conv2d 3x3 {kind} {shape}") for kind in ("forward", "grad_input", "grad_weight")]
        if all(p and _fastest_cuda(p) and "median_s" in p["results"].get("torch", {}) for p in parts):
            ours = sum(_fastest_cuda(p)[1]["median_s"] for p in parts)
            theirs = sum(p["results"]["torch"]["median_s"] for p in parts)
            lines.append(f"conv2d 3x3 forward+backward {shape}: {100 * theirs / ours:.0f}% of cuDNN (target >= 35%)")
    for e in data["sections"]["train"].get("cases", []):
        r = e["results"]
        if "median_s" in r.get("cuda", {}) and "median_s" in r.get("torch", {}):
            ratio = r["cuda"]["median_s"] / r["torch"]["median_s"]
            lines.append(f"{e['case']}: {ratio:.2f}x torch CUDA (target <= 2x)")
    return lines or ["nothing measured yet"]


# ------------------------------------------------------------------ timing one case


@dataclass
class Variant:
    name: str
    run: Callable[[], list]  # one call; returns the outputs to compare
    profile: Callable | None = None  # for torch: the kernel names of one call


@dataclass
class KernelCase:
    name: str
    variants: list[Variant]
    flops: float | None = None
    nbytes: float | None = None
    skipped: dict = field(default_factory=dict)

    @property
    def memory_bound(self):
        return self.flops is None and self.nbytes is not None


class Context:
    def __init__(self, dev, peer, report, shapes, timing, outdir, simulate):
        self.dev, self.peer, self.report, self.shapes = dev, peer, report, shapes
        self.timing, self.outdir, self.simulate = timing, outdir, simulate
        self.copy_bw = None  # bytes/s, once measured
        self.fp32_peak = None  # FLOP/s estimate
        self.deadline = math.inf
        self.only = None  # --only: time only the kernel cases whose name contains one of these

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self):
        self.dev.sync()
        if self.peer:
            self.peer.sync()


def relative_error(actual: list, expected: list) -> float:
    """max over outputs of ||a - b|| / ||b|| (inf on a shape mismatch)."""
    worst = 0.0
    for a, b in zip(actual, expected, strict=True):
        a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
        if a.shape != b.shape:
            return math.inf
        scale = np.linalg.norm(b)
        worst = max(worst, float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0)))
    return worst


def measure_case(case: KernelCase, ctx: Context, timing: Timing | None = None) -> dict:
    """Time every variant of ``case`` (see the module docstring); a variant that raises is reported as skipped."""
    t = timing or ctx.timing
    entry = dict(case=case.name, flops=case.flops, nbytes=case.nbytes, results={}, skipped=dict(case.skipped))
    outputs, live, single = {}, [], {}
    for v in case.variants:
        try:
            ctx.sync()
            t0 = time.perf_counter()
            out = v.run()
            ctx.sync()
            first = time.perf_counter() - t0
            outputs[v.name] = [to_numpy(o) for o in out]
            del out
            seconds = first
            for _ in range(t.warmup):
                seconds, _ = ctx.dev.loop(v.run, 1)
        except Exception as e:
            entry["skipped"][v.name] = f"{type(e).__name__}: {e}"[:500]
            continue
        live.append(v)
        single[v.name] = seconds
        entry["results"][v.name] = dict(first_call_s=first)
    if not live:
        return entry
    reference = "torch" if "torch" in outputs else live[0].name
    entry["reference"] = reference
    for v in live:
        entry["results"][v.name]["rel_err"] = relative_error(outputs[v.name], outputs[reference])
    del outputs
    repeats = {v.name: int(min(t.max_repeats, max(1, math.ceil(t.min_loop_s / max(single[v.name], 1e-7))))) for v in live}
    # Slow variants (a naive kernel at seconds per call) get fewer loops, so one case cannot eat the budget.
    samples = {v.name: t.samples if single[v.name] < 0.2 else min(t.samples, 3 if single[v.name] < 1 else 1) for v in live}
    times = {v.name: [] if t.samples else [(single[v.name], single[v.name])] for v in live}
    for k in range(t.samples):
        for v in live:
            if k >= samples[v.name]:
                continue
            if case.memory_bound:
                ctx.dev.flush_l2()
            times[v.name].append(ctx.dev.loop(v.run, repeats[v.name]))
    torch_s = None
    for v in live:
        device = np.array([d for d, _ in times[v.name]])
        host = np.array([h for _, h in times[v.name]])
        r = entry["results"][v.name]
        r.update(median_s=float(np.median(device)), min_s=float(device.min()), max_s=float(device.max()),
                 host_s=float(np.median(host)), repeats=repeats[v.name], samples=len(device))
        if v.name == "torch":
            torch_s = r["median_s"]
    for v in live:
        r = entry["results"][v.name]
        if case.flops:
            r["gflops"] = case.flops / r["median_s"] / 1e9
            r["pct_peak"] = 100 * case.flops / r["median_s"] / ctx.fp32_peak if ctx.fp32_peak else None
        if case.nbytes:
            r["gbytes_per_s"] = case.nbytes / r["median_s"] / 1e9
            r["pct_copy"] = 100 * case.nbytes / r["median_s"] / ctx.copy_bw if ctx.copy_bw else None
        r["pct_cudnn"] = 100 * torch_s / r["median_s"] if torch_s else None
        if v.profile is not None:
            try:
                r["kernels"] = v.profile()
            except Exception as e:
                r["kernels"] = [f"profiler failed: {type(e).__name__}: {e}"[:200]]
    return entry


# ------------------------------------------------------------------ kernel cases


def _normal(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _name(shape) -> str:
    return "x".join(str(d) for d in shape)


CONV_ARGS = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)  # stride, (top/bottom, left/right) padding, dilation, groups: 3x3 'same'


def _conv_problem(shape, rng):
    n, c, h, w, co = shape
    return dict(x=_normal(rng, n, c, h, w), w=_normal(rng, co, c, 3, 3, scale=(9 * c) ** -0.5), b=_normal(rng, co),
                gy=_normal(rng, n, co, h, w))


def _conv_backward(peer, d, mask):
    """torch's conv2d backward (cuDNN) for the gradients in ``mask`` (input, weight, bias)."""
    return peer.torch.ops.aten.convolution_backward(
        d["gy"], d["x"], d["w"], [d["w"].shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
    )


# Each entry: the public kernel function it times -> (shape key, builder). A builder
# gets the shape, NumPy inputs' generator, the device and the peer, and returns
# (case name, NumPy inputs, minseg call(fn, d), torch call(F, d) or None, flops, nbytes, conv);
# ``d`` holds the inputs as the implementation's arrays.
def _conv_case(kind):
    def build(shape, rng):
        n, c, h, w, co = shape
        data = _conv_problem(shape, rng)
        flops = conv_flops(n, c, h, w, co)
        label = f"{_name(shape[:4])}->{co}"
        if kind == "forward":
            return (f"conv2d 3x3 forward {label}", data, lambda fn, d: [fn(d["x"], d["w"], d["b"], *CONV_ARGS)],
                    lambda peer, d: [peer.F.conv2d(d["x"], d["w"], d["b"], padding=1)], flops, None, True)
        if kind == "grad_input":
            return (f"conv2d 3x3 grad_input {label}", data, lambda fn, d: [fn(d["gy"], d["w"], d["x"].shape, *CONV_ARGS)],
                    lambda peer, d: [_conv_backward(peer, d, [True, False, False])[0]], flops, None, True)
        if kind == "grad_weight":
            return (f"conv2d 3x3 grad_weight {label}", data, lambda fn, d: [fn(d["x"], d["gy"], d["w"].shape, *CONV_ARGS)],
                    lambda peer, d: [_conv_backward(peer, d, [False, True, False])[1]], flops, None, True)
        gy_bytes = data["gy"].nbytes
        return (f"conv2d grad_bias {_name((n, co, h, w))}", data, lambda fn, d: [fn(d["gy"])],
                lambda peer, d: [d["gy"].sum((0, 2, 3))], None, gy_bytes + 4 * co, False)

    return "conv", build


def _conv_batch_norm_case(kind):
    """conv2d (3x3, 'same', bias) then batch norm in training (kernels/conv2d_batch_norm): the fused forward
    against torch's conv2d + batch_norm, and the fused backward (the batch norm's, then the conv's grad_input
    and grad_weight) against native_batch_norm_backward + convolution_backward."""
    def build(shape, rng):
        n, c, h, w, co = shape
        data = _conv_problem(shape, rng)
        data.update(bn_weight=rng.uniform(0.5, 1.5, co).astype(np.float32), bn_bias=_normal(rng, co))
        flops, label = conv_flops(n, c, h, w, co), f"{_name(shape[:4])}->{co}"
        if kind == "training":
            return (f"conv2d 3x3 + batch_norm forward {label}", data,
                    lambda fn, d: [fn(d["x"], d["w"], d["b"], *CONV_ARGS, d["bn_weight"], d["bn_bias"], None, None, 0.1, 1e-5)[0]],
                    lambda peer, d: [peer.F.batch_norm(peer.F.conv2d(d["x"], d["w"], d["b"], padding=1), None, None,
                                                       d["bn_weight"], d["bn_bias"], training=True, eps=1e-5)], flops, None, True)
        # the backward's saved arrays, from the conv's output (NumPy reference, float64 statistics)
        z = importlib.import_module("kernels.conv2d.reference").conv2d_forward(data["x"], data["w"], data["b"], *CONV_ARGS)
        mean, var = z.mean((0, 2, 3), dtype=np.float64), z.var((0, 2, 3), dtype=np.float64)
        invstd = 1 / np.sqrt(var + 1e-5)
        data.update(z=z, mean=mean.astype(np.float32), invstd=invstd.astype(np.float32),
                    xhat=((z - mean[:, None, None]) * invstd[:, None, None]).astype(np.float32))

        def torch_call(peer, d):
            gz = peer.torch.ops.aten.native_batch_norm_backward(d["gy"], d["z"], d["bn_weight"], None, None, d["mean"], d["invstd"],
                                                                True, 1e-5, [True, False, False])[0]
            gx, gw, _ = peer.torch.ops.aten.convolution_backward(gz, d["x"], d["w"], [d["w"].shape[0]], [1, 1], [1, 1], [1, 1], False,
                                                                 [0, 0], 1, [True, True, False])
            return [gx, gw]

        return (f"batch_norm + conv2d 3x3 backward {label}", data,
                lambda fn, d: list(fn(d["gy"], d["x"], d["w"], d["xhat"], d["invstd"], d["bn_weight"], *CONV_ARGS, True, None,
                                      (True, True, False))[:2]),
                torch_call, 2 * flops, None, True)

    return "conv", build


def _activation_case(kind):
    def build(shape, rng):
        n, c, h, w = shape
        size, label = n * c * h * w * 4, _name(shape)
        x, gy = _normal(rng, *shape), _normal(rng, *shape)
        if kind == "relu_forward":
            return (f"relu forward {label}", dict(x=x), lambda fn, d: [fn(d["x"])],
                    lambda peer, d: [peer.torch.relu(d["x"])], None, 2 * size, False)
        if kind == "relu_backward":
            return (f"relu backward {label}", dict(y=np.maximum(x, 0), gy=gy), lambda fn, d: [fn(d["y"], d["gy"])],
                    lambda peer, d: [peer.torch.ops.aten.threshold_backward(d["gy"], d["y"], 0)], None, 3 * size, False)
        if kind.startswith("batch_norm"):
            x = (x * 2 + 3).astype(np.float32)
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
            invstd = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
            xhat = ((x - mean[:, None, None]) * invstd[:, None, None]).astype(np.float32)
            data = dict(x=x, gy=gy, mean=mean, var=var, invstd=invstd, xhat=xhat, weight=_normal(rng, c), bias=_normal(rng, c))
            if kind == "batch_norm_stats":  # one read of x
                return (f"batch_norm stats {label}", data, lambda fn, d: list(fn(d["x"])),
                        lambda peer, d: list(peer.torch.var_mean(d["x"], (0, 2, 3), correction=0))[::-1], None, size, False)
            if kind == "batch_norm_forward":  # read x, write y (minseg also writes xhat for the backward)
                return (f"batch_norm forward {label}", data,
                        lambda fn, d: [fn(d["x"], d["mean"], d["var"], d["weight"], d["bias"], 1e-5)[0]],
                        lambda peer, d: [peer.torch.ops.aten.native_batch_norm(
                            d["x"], d["weight"], d["bias"], d["mean"], d["var"], False, 0.0, 1e-5)[0]], None, 2 * size, False)
            # backward, training: one pass reads gy and x for the sums, one reads them again and writes gx
            return (f"batch_norm backward {label}", data,
                    lambda fn, d: list(fn(d["gy"], d["xhat"], d["invstd"], d["weight"], True)),
                    lambda peer, d: list(peer.torch.ops.aten.native_batch_norm_backward(
                        d["gy"], d["x"], d["weight"], None, None, d["mean"], d["invstd"], True, 1e-5, [True, True, True])),
                    None, 5 * size, False)
        pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
        # minseg stores each window's tap number in uint8 (a quarter of a float), torch the int64 flat index
        if kind == "max_pool2d_forward":  # read x, write y and the indices; y compared (the indices differ in kind)
            return (f"max_pool2d 2x2 forward {label}", dict(x=x),
                    lambda fn, d: [fn(d["x"], (2, 2), (2, 2), (0, 0), (1, 1), False)[0]],
                    lambda peer, d: [peer.torch.ops.aten.max_pool2d_with_indices(d["x"], *pool)[0]], None,
                    size + size // 4 + size // 16, False)
        if kind == "max_pool2d_backward":  # read gy and indices, write gx
            taps, idx = _pool_indices(x)
            return (f"max_pool2d 2x2 backward {label}",
                    dict(x=x, gy=_normal(rng, n, c, h // 2, w // 2), taps=taps, idx=idx),
                    lambda fn, d: [fn(d["gy"], d["taps"], d["x"].shape, (2, 2), (2, 2), (0, 0), (1, 1))],
                    lambda peer, d: [peer.torch.ops.aten.max_pool2d_with_indices_backward(d["gy"], d["x"], *pool, d["idx"])],
                    None, size // 4 + size // 16 + size, False)
        if kind == "avg_pool2d_forward":  # read x, write y
            return (f"avg_pool2d 2x2 forward {label}", dict(x=x),
                    lambda fn, d: [fn(d["x"], (2, 2), (2, 2), (0, 0), False, True, None)],
                    lambda peer, d: [peer.F.avg_pool2d(d["x"], 2)], None, size + size // 4, False)
        if kind == "avg_pool2d_backward":  # read gy, write gx
            return (f"avg_pool2d 2x2 backward {label}", dict(x=x, gy=_normal(rng, n, c, h // 2, w // 2)),
                    lambda fn, d: [fn(d["gy"], d["x"].shape, (2, 2), (2, 2), (0, 0), False, True, None)],
                    lambda peer, d: [peer.torch.ops.aten.avg_pool2d_backward(
                        d["gy"], d["x"], [2, 2], [2, 2], [0, 0], False, True, None)], None, size // 4 + size, False)
        if kind == "adaptive_avg_pool2d_forward":  # the global pool of a DeepLab/ASPP head: read x, write (N, C)
            return (f"adaptive_avg_pool2d 1x1 forward {label}", dict(x=x), lambda fn, d: [fn(d["x"], (1, 1))],
                    lambda peer, d: [peer.F.adaptive_avg_pool2d(d["x"], 1)], None, size, False)
        if kind == "adaptive_avg_pool2d_backward":  # read (N, C), write gx
            return (f"adaptive_avg_pool2d 1x1 backward {label}", dict(x=x, gy=_normal(rng, n, c, 1, 1)),
                    lambda fn, d: [fn(d["gy"], d["x"].shape)],
                    lambda peer, d: [peer.torch.ops.aten._adaptive_avg_pool2d_backward(d["gy"], d["x"])], None, size, False)
        if kind == "cat_forward":  # a U-Net skip join along the channels: read both pieces, write y
            return (f"cat channels forward {label}", dict(x=x, gy=gy), lambda fn, d: [fn([d["x"], d["gy"]], 1)],
                    lambda peer, d: [peer.torch.cat([d["x"], d["gy"]], 1)], None, 4 * size, False)
        if kind == "cat_backward":  # read the joined gradient, write both pieces (torch's are views: copied here)
            return (f"cat channels backward {label}", dict(g=_normal(rng, n, 2 * c, h, w)),
                    lambda fn, d: list(fn(d["g"], (c, c), 1, (True, True))),
                    lambda peer, d: [t.contiguous() for t in peer.torch.split(d["g"], c, 1)], None, 4 * size, False)
        args = ("bilinear", False, (0.5, 0.5))  # scales: input size / output size per axis
        if kind == "interpolate_cat_forward":  # a U-Net decoder's input: read x and the skip (4x x), write y (8x x)
            skip = _normal(rng, n, c, 2 * h, 2 * w)
            return (f"bilinear x2 + cat channels forward {label}", dict(x=x, skip=skip),
                    lambda fn, d: [fn(d["skip"], d["x"], (2 * h, 2 * w), *args)],
                    lambda peer, d: [peer.torch.cat([d["skip"], peer.F.interpolate(d["x"], scale_factor=2, mode="bilinear",
                                                                                   align_corners=False)], 1)],
                    None, 13 * size, False)
        if kind == "interpolate_cat_backward":  # read gy (8x x), write the skip's gradient (4x x) and gx
            g = _normal(rng, n, 2 * c, 2 * h, 2 * w)
            return (f"bilinear x2 + cat channels backward {label}", dict(x=x, g=g),
                    lambda fn, d: list(fn(d["g"], c, d["x"].shape, *args, (True, True))),
                    lambda peer, d: [d["g"][:, :c].contiguous(), peer.torch.ops.aten.upsample_bilinear2d_backward(
                        d["g"][:, c:], [2 * h, 2 * w], list(d["x"].shape), False, None, None)], None, 13 * size, False)
        if kind == "interpolate_forward":  # read x, write the 4x larger y
            return (f"bilinear x2 forward {label}", dict(x=x), lambda fn, d: [fn(d["x"], (2 * h, 2 * w), *args)],
                    lambda peer, d: [peer.F.interpolate(d["x"], scale_factor=2, mode="bilinear", align_corners=False)],
                    None, 5 * size, False)
        return (f"bilinear x2 backward {label}", dict(x=x, gy=_normal(rng, n, c, 2 * h, 2 * w)),
                lambda fn, d: [fn(d["gy"], d["x"].shape, *args)],
                lambda peer, d: [peer.torch.ops.aten.upsample_bilinear2d_backward(
                    d["gy"], [2 * h, 2 * w], list(d["x"].shape), False, None, None)], None, 5 * size, False)

    return "activation", build


def _pool_indices(x):
    """(taps, flat) of each 2x2 window's (first) maximum: minseg's uint8 tap number 2p + q, and the flat
    in-plane index torch's max_pool2d returns."""
    n, c, h, w = x.shape
    win = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    arg = win.reshape(n, c, h // 2, w // 2, 4).argmax(-1)
    rows = np.arange(h // 2)[:, None] * 2 + arg // 2
    cols = np.arange(w // 2)[None, :] * 2 + arg % 2
    return arg.astype(np.uint8), (rows * w + cols).astype(np.int64)


def _sgd_case(shape, rng):
    """One SGD step (momentum, weight decay; a later step, so the buffer is read) of a parameter of
    ``shape``'s size, against torch.optim's functional sgd: read p, g and b, write p and b.

    The step works in place, so each side gets its own parameter and buffer (p, b and tp, tb: under
    the simulator the device arrays and torch's CPU tensors share the NumPy inputs' memory); the
    outputs compared are those after the first call (every variant makes the same number of calls
    before the comparison).
    """
    size = math.prod(shape)
    p, b = _normal(rng, size), _normal(rng, size)
    data = dict(p=p, b=b, tp=p.copy(), tb=b.copy(), g=_normal(rng, size))
    hyper = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False)

    def minseg(fn, d):
        fn(d["p"], d["g"], d["b"], **hyper, first_step=False)
        return [d["p"], d["b"]]

    def torch_call(peer, d):
        sgd = importlib.import_module("torch.optim.sgd").sgd  # torch.optim.SGD's step, on plain lists of tensors
        sgd([d["tp"]], [d["g"]], [d["tb"]], maximize=False, **hyper)
        return [d["tp"], d["tb"]]

    return (f"sgd step (momentum, weight decay) {_name(shape)}", data, minseg, torch_call, None, 5 * 4 * size, False)


def _accumulate_case(shape, rng):
    """The backward walk's gradient sum ``total += part`` of an activation-sized gradient, against torch's
    ``add_``: read total and part, write total.

    In place, as ``_sgd_case``: each side gets its own ``total`` (t and tt), and the outputs compared
    are those after the first call.
    """
    size = math.prod(shape)
    t = _normal(rng, size)
    data = dict(t=t, tt=t.copy(), g=_normal(rng, size))

    def minseg(fn, d):
        fn(d["t"], d["g"])
        return [d["t"]]

    return (f"accumulate (gradient sum) {_name(shape)}", data, minseg, lambda peer, d: [d["tt"].add_(d["g"])], None,
            3 * 4 * size, False)


def _cross_entropy_case(shape, rng):
    """The fused cross-entropy's forward and backward kernels (mean reduction), and torch's loss + its gradient."""
    n, c, h, w = shape
    data = dict(logits=_normal(rng, n, c, h * w), target=rng.integers(0, c, (n, h * w)).astype(np.int64),
                gloss=np.ones((), np.float32))

    K = importlib.import_module("kernels.softmax_cross_entropy.cuda")

    def minseg(fn, d):
        loss, dlogits, _, _ = fn(d["logits"], d["target"], None, -100, "mean", 0.0, True)
        return [loss, K.cross_entropy_backward(dlogits, d["gloss"], "mean")]

    def torch_call(peer, d):
        logits = d["logits"].detach().requires_grad_(True)
        loss = peer.F.cross_entropy(logits, d["target"])
        return [loss, peer.torch.autograd.grad(loss, logits)[0]]

    return (f"cross_entropy fwd+bwd {_name(shape)}", data, minseg, torch_call, None, cross_entropy_bytes(n, c, h, w), False)


KERNEL_CASES = {
    "kernels.conv2d.cuda": {
        "conv2d_forward": _conv_case("forward"),
        "conv2d_grad_input": _conv_case("grad_input"),
        "conv2d_grad_weight": _conv_case("grad_weight"),
        "conv2d_grad_bias": _conv_case("grad_bias"),
    },
    "kernels.conv2d_batch_norm.cuda": {
        "conv2d_batch_norm_training": _conv_batch_norm_case("training"),
        "conv2d_batch_norm_backward": _conv_batch_norm_case("backward"),
    },
    "kernels.relu.cuda": {k: _activation_case(k) for k in ("relu_forward", "relu_backward")},
    "kernels.cat.cuda": {k: _activation_case(k) for k in ("cat_forward", "cat_backward")},
    "kernels.batch_norm.cuda": {k: _activation_case(k) for k in ("batch_norm_stats", "batch_norm_forward", "batch_norm_backward")},
    "kernels.max_pool2d.cuda": {k: _activation_case(k) for k in ("max_pool2d_forward", "max_pool2d_backward")},
    "kernels.interpolate.cuda": {k: _activation_case(k) for k in ("interpolate_forward", "interpolate_backward")},
    "kernels.interpolate_cat.cuda": {k: _activation_case(k) for k in ("interpolate_cat_forward", "interpolate_cat_backward")},
    "kernels.avg_pool2d.cuda": {k: _activation_case(k) for k in ("avg_pool2d_forward", "avg_pool2d_backward",
                                                                 "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward")},
    "kernels.softmax_cross_entropy.cuda": {"cross_entropy_forward": ("cross_entropy", _cross_entropy_case)},
    "kernels.sgd.cuda": {"sgd_step": ("activation", _sgd_case)},
    "kernels.accumulate.cuda": {"accumulate": ("activation", _accumulate_case)},
}


def cuda_modules() -> list[str]:
    return sorted(f"kernels.{p.parent.name}.cuda" for p in (ROOT / "kernels").glob("*/cuda.py"))


def kernel_versions(module, cased: list[str]) -> tuple[dict, list[str]]:
    """({function name: {label: callable}} for the functions in ``cased``, problems).

    A ``<STEM>_VERSIONS`` dict belongs to the function named ``<stem>`` or ending in
    ``_<stem>``; a dict that matches none or several of ``cased`` is a problem
    (a version no case times).
    """
    versions, problems = {}, []
    for attr in sorted(a for a in vars(module) if a.endswith("_VERSIONS")):
        table = getattr(module, attr)
        stem = attr[: -len("_VERSIONS")].lower()
        owners = [f for f in cased if f == stem or f.endswith("_" + stem)]
        if len(owners) != 1 or not isinstance(table, dict):
            problems.append(f"{module.__name__}.{attr} matches {owners or 'no'} timed function(s) of {cased}: "
                            "add its case to benchmarks/gpu.py KERNEL_CASES")
            continue
        fn = getattr(module, owners[0])
        default = getattr(module, f"DEFAULT_{attr[: -len('_VERSIONS')]}_VERSION", None)
        by_keyword = "version" in inspect.signature(fn).parameters
        versions[owners[0]] = {
            f"cuda v{k}" + (" (default)" if k == default else ""): functools.partial(fn, version=k) if by_keyword else table[k]
            for k in sorted(table)
        }
    for name in cased:
        if name not in versions:
            versions[name] = {"cuda": getattr(module, name)}
    return versions, problems


def kernel_cases(ctx: Context) -> tuple[list[Callable[[], KernelCase]], list[str]]:
    """Builders of every case (built lazily, one at a time, to hold one case's arrays), and problems found."""
    builders, problems = [], []
    for modname in cuda_modules():
        cased = KERNEL_CASES.get(modname)
        if cased is None:
            problems.append(f"{modname} has no cases in benchmarks/gpu.py KERNEL_CASES: its kernels are not timed")
            continue
        module = importlib.import_module(modname)
        missing = [f for f in cased if not hasattr(module, f)]
        if missing:
            problems.append(f"{modname} lacks {missing}: benchmarks/gpu.py KERNEL_CASES is out of date")
            continue
        versions, found = kernel_versions(module, list(cased))
        problems += found
        for fn_name, (shape_key, build) in cased.items():
            shapes = ctx.shapes[shape_key] if shape_key in ("conv", "cross_entropy") else [ctx.shapes[shape_key]]
            for shape in shapes:
                builders.append(functools.partial(_make_case, ctx, build, shape, versions[fn_name]))
    return builders, problems


def _make_case(ctx: Context, build, shape, versions: dict) -> KernelCase:
    rng = np.random.default_rng(0)
    name, data, minseg_call, torch_call, flops, nbytes, is_conv = build(shape, rng)
    dev_data = {k: ctx.dev.asarray(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}
    variants = [Variant(label, functools.partial(minseg_call, fn, dev_data)) for label, fn in versions.items()]
    case = KernelCase(name, variants, flops, nbytes)
    if ctx.peer is None:
        case.skipped["torch"] = "torch is not installed"
        return case
    peer = ctx.peer
    t_data = {k: peer.tensor(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}
    for tf32 in (False, True) if is_conv else (False,):
        name_t = "torch tf32" if tf32 else "torch"
        if tf32 and ctx.simulate:
            case.skipped[name_t] = f"TF32 {SKIP_ON_SIMULATOR}"
            continue

        def run(tf32=tf32):
            peer.set_tf32(tf32)
            with peer.torch.no_grad() if "cross_entropy" not in name else contextlib.nullcontext():
                return torch_call(peer, t_data)

        profile = functools.partial(peer.kernel_names, run) if is_conv else None
        variants.append(Variant(name_t, run, profile))
    return case


# ------------------------------------------------------------------ sections


def section_machine(ctx: Context):
    info = dict(python=platform.python_version(), host=machine.cpu_model(), packages=package_versions())
    if ctx.simulate:
        info["device"] = "Numba CUDA simulator (no GPU)"
    else:
        info.update(gpu_properties())
        info["nvidia_smi"] = nvidia_smi()
        if "fp32_peak_estimate_tflops" not in info:  # CUDA 13 dropped clockRate from the properties
            mhz = smi_field(info["nvidia_smi"], "clocks.max.sm")
            lanes = FP32_LANES.get(tuple(int(v) for v in info["compute_capability"].split(".")))
            if mhz and lanes:
                info["sm_clock_max_mhz"] = mhz
                info["fp32_peak_estimate_tflops"] = info["multiprocessors"] * lanes * 2 * mhz * 1e6 / 1e12
        ctx.fp32_peak = info.get("fp32_peak_estimate_tflops", 0) * 1e12 or None
    if ctx.peer is not None:
        t = ctx.peer.torch
        info.update(torch_device=ctx.peer.device, cudnn=t.backends.cudnn.version() if ctx.peer.device == "cuda" else None,
                    cudnn_benchmark=t.backends.cudnn.benchmark)
    ctx.report.section("machine", info=info)


def package_versions() -> dict:
    names = ["numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "cupy", "torch", "mpi4py", "nvidia-nccl-cu13",
             "nvidia-nccl-cu12", "cuda-bindings", "nvidia-nvjitlink", "nvidia-nvvm", "nvidia-cuda-runtime", "hypothesis",
             "pytest"]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


# FP32 lanes per SM by compute capability (CUDA C Programming Guide, arithmetic instruction throughput).
FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128, (10, 0): 128, (12, 0): 128}


def gpu_properties() -> dict:
    import cupy

    p = cupy.cuda.runtime.getDeviceProperties(0)
    name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
    cc = (p["major"], p["minor"])
    info = dict(
        gpu=name, compute_capability=f"{cc[0]}.{cc[1]}", multiprocessors=p["multiProcessorCount"],
        memory_gib=round(p["totalGlobalMem"] / 2**30, 1), l2_mib=round(p["l2CacheSize"] / 2**20, 1),
        driver=cupy.cuda.runtime.driverGetVersion(), runtime=cupy.cuda.runtime.runtimeGetVersion(),
    )
    clock_khz = p.get("clockRate")
    if clock_khz:  # absent from the properties of CUDA 13 runtimes: then nvidia-smi's max clock is the record
        info["sm_clock_max_mhz"] = clock_khz / 1e3
        lanes = FP32_LANES.get(cc)
        if lanes:
            info["fp32_peak_estimate_tflops"] = p["multiProcessorCount"] * lanes * 2 * clock_khz * 1e3 / 1e12
    return info


def nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "nvidia-smi not found"
    fields = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,pstate"
    try:
        run = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv"], capture_output=True, text=True, timeout=15)
        return (run.stdout + run.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"


def smi_field(csv: str, name: str) -> float | None:
    """A number from nvidia-smi's CSV (header line, then the first GPU's line), e.g. 'clocks.max.sm' -> 1980.0."""
    lines = csv.splitlines()
    if len(lines) < 2:
        return None
    for head, value in zip(lines[0].split(","), lines[1].split(",")):
        if head.strip().split(" ")[0] == name:
            match = re.match(r"\s*([\d.]+)", value)
            return float(match.group(1)) if match else None
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def section_tests(ctx: Context):
    """pytest on the CUDA tests in a subprocess, the simulator off on a GPU; log and JUnit XML into OUTDIR."""
    log, junit = ctx.outdir / "cuda_tests.log", ctx.outdir / "cuda_tests.xml"
    env = dict(_child_env(), NUMBA_ENABLE_CUDASIM="1" if ctx.simulate else "0", MINSEG_POISON="1")
    missing = [m for m in ("pytest", "hypothesis") if not _installed(m)]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not installed here, so the CUDA tests cannot run (every kernel is "
                           "still compared with torch in the kernels section). On a machine where nothing can be "
                           "installed: 'pip install --target .gpu-deps pytest hypothesis' in the checkout beforehand "
                           "(pure Python), then run with PYTHONPATH=.:.gpu-deps")
    cmd = [sys.executable, "-m", "pytest", *ctx.shapes["tests"], "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    workers = min(8, (os.cpu_count() or 1) // 2)
    if not ctx.simulate and workers > 1 and _installed("xdist"):
        # On a GPU most of the tests' time is compiling kernels (NVVM, one core each): the first run on an
        # H100 ran 9 tests in its 140 s serially (all failing, see kernels/__init__.py). Test by test: a hypothesis test
        # compiles a kernel per drawn geometry, so one file (conv2d) would hold one worker for most of the time.
        cmd += ["-n", str(workers), "--dist", "load"]
    limit = max(1.0, ctx.time_left())
    ctx.report.section("tests", command=" ".join(cmd), log=log.name, limit_s=limit)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    summary = junit_summary(junit) if junit.exists() else dict(tail=log.read_text()[-2000:])
    summary["exit_code"] = code
    if code is None:
        summary["timed_out"] = True
    ctx.report.section("tests", summary=summary)
    if code not in (0,):
        raise RuntimeError(f"pytest exited {code}" if code is not None else f"pytest timed out after {limit:.0f} s")


def junit_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


@cuda.jit
def copy_kernel(src, dst):
    """The copy-bandwidth kernel: one float32 per thread, as minseg's elementwise kernels do."""
    i = cuda.grid(1)
    if i < src.size:
        dst[i] = src[i]


def section_copy(ctx: Context):
    n = ctx.shapes["copy_bytes"] // 4
    src = ctx.dev.asarray(np.arange(n, dtype=np.float32))
    dst = ctx.dev.asarray(np.zeros(n, dtype=np.float32))
    threads = 256
    paths = [("numba copy kernel (1 float32 per thread)", lambda: copy_kernel[-(-n // threads), threads](src, dst))]
    if ctx.simulate:
        ctx.report.add_case("copy", dict(name="cupy device-to-device memcpy", bytes=2 * 4 * n, median_s=None,
                                         gbytes_per_s=None, skipped=f"CuPy {SKIP_ON_SIMULATOR}"))
    else:
        paths.insert(0, ("cupy device-to-device memcpy", lambda: dst.data.copy_from_device_async(src.data, 4 * n)))
    for name, fn in paths:
        ctx.dev.loop(fn, 1)
        ctx.dev.flush_l2()
        seconds = float(np.median([ctx.dev.loop(fn, 1)[0] for _ in range(ctx.timing.samples)]))
        if not bool((dst == src).all()):
            raise RuntimeError(f"{name}: the copy differs from its source")
        ctx.dev.asarray(dst).fill(0)
        bw = 2 * 4 * n / seconds
        ctx.report.add_case("copy", dict(name=name, bytes=2 * 4 * n, median_s=seconds, gbytes_per_s=bw / 1e9))
        ctx.copy_bw = ctx.copy_bw or bw  # the first measured path (CuPy's memcpy on a GPU) is the ceiling
    ctx.report.section("copy", ceiling_gbytes_per_s=ctx.copy_bw / 1e9)


# The launch-overhead kernels: trivial, with 1 and with 4 array arguments.
@cuda.jit
def touch1(a, n):
    i = cuda.grid(1)
    if i < n:
        a[i] = 1.0


@cuda.jit
def touch4(a, b, c, d, n):
    i = cuda.grid(1)
    if i < n:
        a[i] = 1.0
        b[i] = 1.0
        c[i] = 1.0
        d[i] = 1.0


LAUNCH_KERNELS = {1: touch1, 4: touch4}


def launch_signature(arrays: int) -> str:
    return "void(" + "float32[::1], " * arrays + "int64)"


def numba_array_params(a) -> list:
    """The kernel parameters Numba's calling convention passes for one C-contiguous array:
    meminfo and parent pointers (unused on the device: 0), nitems, itemsize, the data
    pointer, then shape and strides."""
    return [np.uint64(0), np.uint64(0), np.int64(a.size), np.int64(a.itemsize), a,
            *(np.int64(s) for s in a.shape), *(np.int64(s) for s in a.strides)]


def ptx_entry(ptx: str) -> tuple[str, int]:
    """(name, parameter count) of the one kernel entry of ``ptx``."""
    match = re.search(r"\.entry\s+(\S+)\s*\(([^)]*)\)", ptx)
    if not match:
        raise ValueError("no .entry in the PTX")
    return match.group(1), match.group(2).count(".param")


def compile_launch_kernels(outdir: Path, cc: str) -> dict:
    """PTX and cubin of the launch kernels, compiled in a subprocess with the simulator off."""
    env = dict(_child_env(), NUMBA_ENABLE_CUDASIM="0")
    code = f"from benchmarks.gpu import _compile_launch_kernels_main; _compile_launch_kernels_main({str(outdir)!r}, {cc!r})"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise RuntimeError(f"compiling the launch kernels failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout)


def _compile_launch_kernels_main(outdir: str, cc: str):
    """Subprocess body: compile each launch kernel to PTX (NVVM) and link it to a cubin (nvJitLink);
    the copy kernel too (compile only, so a CPU run checks that it compiles for a GPU)."""
    from .ptx_report import _assume_device

    _assume_device(cc)
    result = {}
    for arrays, kernel in LAUNCH_KERNELS.items():
        ptx, _ = cuda.compile_ptx(kernel.py_func, launch_signature(arrays), cc=(int(cc[:-1]), int(cc[-1])))
        name, params = ptx_entry(ptx)
        ptx_path = Path(outdir) / f"launch{arrays}.ptx"
        ptx_path.write_text(ptx)
        entry = dict(name=name, params=params, ptx=str(ptx_path))
        try:
            entry["cubin"] = str(_link_cubin(ptx, cc, Path(outdir) / f"launch{arrays}.cubin"))
        except Exception as e:  # the driver can still JIT the PTX itself
            entry["cubin_error"] = f"{type(e).__name__}: {e}"
        result[arrays] = entry
    cuda.compile_ptx(copy_kernel.py_func, "void(float32[::1], float32[::1])", cc=(int(cc[:-1]), int(cc[-1])))
    print(json.dumps(result))


def _link_cubin(ptx: str, cc: str, path: Path) -> Path:
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(1, [f"-arch=sm_{cc}"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "launch.ptx")
        nvjitlink.complete(handle)
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
    finally:
        nvjitlink.destroy(handle)
    path.write_bytes(bytes(cubin))
    return path


def section_launch(ctx: Context):
    n, count = 32, ctx.shapes["launches"]
    if ctx.simulate:
        cc = "90"
    else:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        cc = f"{props['major']}{props['minor']}"
    compiled = compile_launch_kernels(ctx.outdir, cc)
    for arrays, kernel in LAUNCH_KERNELS.items():
        host = [np.zeros(n, np.float32) for _ in range(arrays)]
        paths = [("numba, CuPy arrays" if not ctx.simulate else "numba, NumPy arrays (simulator)",
                  [ctx.dev.asarray(a) for a in host])]
        paths.append(("numba, Numba device arrays", [cuda.to_device(a) for a in host]))
        for name, args in paths:
            note = ""
            fn = functools.partial(kernel[1, n], *args, n)
            ctx.dev.loop(fn, 1)
            ctx.sync()
            device_s, host_s = zip(*(ctx.dev.loop(fn, count) for _ in range(3)))
            ctx.sync()
            check = [to_numpy(a.copy_to_host() if hasattr(a, "copy_to_host") else a) for a in args]
            if not all((c == 1).all() for c in check):
                raise RuntimeError(f"{name}: the kernel did not write its arrays")
            ctx.report.add_case("launch", dict(name=name, arrays=arrays, host_us=1e6 * float(np.median(host_s)),
                                               device_us=1e6 * float(np.median(device_s)), launches=count, note=note))
        info = compiled[str(arrays)]
        raw_args = [p for a in paths[0][1] for p in numba_array_params(a)] + [np.int64(n)]
        if len(raw_args) != info["params"]:
            raise RuntimeError(f"Numba's PTX entry takes {info['params']} parameters, RawModule would pass {len(raw_args)}")
        name = "CuPy RawModule, Numba's PTX" + (" linked to a cubin" if "cubin" in info else "")
        if ctx.simulate:
            ctx.report.add_case("launch", dict(name=name, arrays=arrays, skipped=f"CuPy {SKIP_ON_SIMULATOR}; the "
                                               f"{info['params']} parameters of the PTX entry match the arguments"))
            continue
        import cupy

        module = cupy.RawModule(path=info.get("cubin", info["ptx"]))
        raw = module.get_function(info["name"])
        out = [cupy.zeros(n, cupy.float32) for _ in range(arrays)]
        raw_args = [p for a in out for p in numba_array_params(a)] + [np.int64(n)]
        fn = functools.partial(raw, (1,), (n,), tuple(raw_args))
        ctx.dev.loop(fn, 1)
        device_s, host_s = zip(*(ctx.dev.loop(fn, count) for _ in range(3)))
        ctx.sync()
        if not all(bool((a == 1).all()) for a in out):
            raise RuntimeError(f"{name}: the kernel did not write its arrays")
        ctx.report.add_case("launch", dict(name=name, arrays=arrays, host_us=1e6 * float(np.median(host_s)),
                                           device_us=1e6 * float(np.median(device_s)), launches=count))


def section_kernels(ctx: Context):
    builders, problems = kernel_cases(ctx)
    ctx.report.section("kernels", problems=problems, planned=len(builders), only=ctx.only)
    for i, build in enumerate(builders, 1):
        if ctx.time_left() <= 0:
            ctx.report.add_case("kernels", dict(case=f"case {i} of {len(builders)}", results={},
                                                skipped={"all": "the section's time budget was spent"}))
            continue
        try:
            case = build()
        except Exception as e:
            ctx.report.add_case("kernels", dict(case=f"case {i} of {len(builders)}", results={},
                                                skipped={"build": f"{type(e).__name__}: {e}"[:500]}))
            continue
        if ctx.only and not any(t in case.name for t in ctx.only):
            continue
        _progress(f"  kernels [{i}/{len(builders)}] {case.name}")
        ctx.report.add_case("kernels", measure_case(case, ctx))
        del case
        ctx.dev.free()
        if ctx.peer:
            ctx.peer.free()
    if problems:
        raise RuntimeError(f"{len(problems)} kernel version(s) not timed: " + "; ".join(problems))


def section_train(ctx: Context):
    from .cases import MinsegLib
    from .train import train_case

    libs = [MinsegLib("cuda")] + ([ctx.peer.lib] if ctx.peer else [])
    case, facts = train_case(libs, ctx.shapes["train"])
    variants = []
    for impl in case.impls:
        def run(impl=impl):
            impl.reset()
            return impl.run()

        variants.append(Variant(impl.name, run))
    kcase = KernelCase(case.name, variants, case.flops, None, dict(case.skipped))
    ctx.report.section("train", model=facts)
    ctx.report.add_case("train", measure_case(kcase, ctx, SIMULATOR_TRAIN_TIMING if ctx.simulate else None))


SECTION_FUNCTIONS = dict(machine=section_machine, tests=section_tests, copy=section_copy, launch=section_launch,
                         kernels=section_kernels, train=section_train)


# ------------------------------------------------------------------ the command


def _progress(line: str):
    print(line, file=sys.stderr, flush=True)


def _simulate_on_one_core() -> list:
    """Pin this process to one core (the last it may use) for ``--simulate``; returns the cores it runs on.

    The simulator runs every CUDA thread as a Python thread, and they hand the GIL to each other
    thousands of times per kernel: on two cores each hand-over wakes a thread on the other core, which
    costs more than the work between. ``--simulate --all`` measured 65 s of CPU unpinned and 20 s pinned
    (alone, on the 2-core development machine). The last core: the test suite pins its own simulated
    tests to the first (tests/conftest.py), and runs this command beside them. Threads started later
    (the simulator's, the tests section's pytest) inherit the affinity."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
        return sorted(os.sched_getaffinity(0))
    return []


def run_all(args, argv) -> int:
    outdir = Path(args.all)
    outdir.mkdir(parents=True, exist_ok=True)
    simulate = args.simulate
    cores = _simulate_on_one_core() if simulate else None
    sections = args.sections or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
        return 2
    dev = Simulator() if simulate else GPU()
    try:
        peer = Peer("cpu" if simulate else "cuda")
    except ImportError:
        peer = None
    device = "Numba CUDA simulator (CPU)" if simulate else gpu_properties()["gpu"]
    report = Report(outdir, dict(mode="simulate" if simulate else "gpu", device=device, date_utc=machine.utc_now(),
                                 command="python -m benchmarks " + " ".join(argv), budget_s=args.budget, cpu_cores=cores))
    ctx = Context(dev, peer, report, SHAPES["simulator" if simulate else "gpu"],
                  SIMULATOR_TIMING if simulate else GPU_TIMING, outdir, simulate)
    ctx.only = args.only
    start = time.perf_counter()
    end = start + args.budget
    failed = []
    for name in SECTIONS:
        if name not in sections:
            report.section(name, status="not selected")
            continue
        now = time.perf_counter()
        budget = SECTION_BUDGET_S[name] * args.budget / sum(SECTION_BUDGET_S.values())
        ctx.deadline = min(now + budget, end) if not simulate else math.inf
        _progress(f"[{now - start:5.0f} s] {name} (budget {budget:.0f} s)")
        report.section(name, status="running")
        try:
            SECTION_FUNCTIONS[name](ctx)
            status, error = "done", None
        except Exception as e:
            status, error = "error", f"{type(e).__name__}: {e}"[:2000]
            report.section(name, traceback=traceback.format_exc()[-4000:])
            failed.append(name)
            _progress(f"  {name} failed: {error}")
        report.section(name, status=status, error=error, seconds=time.perf_counter() - now)
    _progress(f"[{time.perf_counter() - start:5.0f} s] done; results in {outdir / 'gpu.md'} and {outdir / 'gpu.json'}")
    print(markdown(report.data))
    return 1 if failed else 0


def _child_env() -> dict:
    """This process's environment with the checkout first on PYTHONPATH (and whatever else was there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _reexec_simulated(argv) -> None:
    """--simulate needs NUMBA_ENABLE_CUDASIM=1 before numba is imported: run the command again in a new process."""
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], dict(_child_env(), NUMBA_ENABLE_CUDASIM="1"))


def run_gpu(args, argv) -> int:
    from numba import config

    from minseg import backend

    if args.simulate and not config.ENABLE_CUDASIM:
        _reexec_simulated(argv)
    status = backend.cuda_status()
    if status != "gpu" and not args.simulate:
        print(f"no GPU: the gpu benchmarks need a CUDA GPU and CuPy ({status}); nothing to time. "
              "(--simulate runs the same code under the CUDA simulator.)")
        return 0
    if not args.all:
        with tempfile.TemporaryDirectory() as tmp:
            print("no OUTDIR given (--all OUTDIR): writing to a temporary directory")
            args.all = tmp
            return run_all(args, argv)
    return run_all(args, argv)
