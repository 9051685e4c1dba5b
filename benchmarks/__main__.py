"""``python -m benchmarks ops|train|gpu|ddp [options]``: see ``benchmarks/__init__.py`` and ``--help``."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from . import machine
from .timing import CompileMeter, add_limits, measure, metered, table

DEFAULT_REPEAT = {"ops": 20, "train": 10, "gpu": 20, "ddp": 10}
QUICK_REPEAT = 2
# Float32 results of the same function land far below this relative error
# (||a - b|| / ||b|| ~ 1e-7 .. 1e-5); above it an implementation computes something else.
REL_ERR_WARN = 1e-3
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="minseg vs PyTorch: interleaved timings, medians, ratios (see benchmarks/__init__.py).",
    )
    p.add_argument("mode", choices=["ops", "train", "gpu", "ddp"], help="ops: the hot ops on the CPU; train: a U-Net training "
                   "step on the CPU; gpu: every GPU check with --all OUTDIR (--simulate: the same on the CPU); ddp: a U-Net step on 1 process vs "
                   "2 MPI ranks, all-reduce time per bucket and the cost model for W machines")
    p.add_argument("--json", metavar="PATH", help="also write every number (and the machine) as JSON to PATH")
    p.add_argument("--repeat", type=int, help="timed calls per implementation (default: ops 20, train 10, gpu 20)")
    p.add_argument("--warmup", type=int, help="untimed calls per implementation, the first included (default 3)")
    p.add_argument("--backends", default="numpy,cpu", help="minseg backends for ops/train, comma-separated "
                   "(default numpy,cpu; one that does not load is reported and skipped)")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch peer")
    p.add_argument("--threads", type=int, help="threads for torch, Numba and BLAS alike (default: usable cores)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats, 1 warm-up: checks that it runs")
    p.add_argument("--only", metavar="TEXT", help="run only the cases whose name contains one of these comma-separated "
                   "strings (e.g. --only conv2d,bilinear)")
    p.add_argument("--unset-openblas-coretype", action="store_true", help="re-run without OPENBLAS_CORETYPE and "
                   "OPENBLAS_L2_SIZE, so numpy's OpenBLAS picks the kernels for this CPU")
    p.add_argument("--malloc-tune", action="store_true", help="re-run with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ "
                   "raised: freed memory is reused instead of page-faulted in again (minseg and torch alike)")
    p.add_argument("--no-cache-check", action="store_true", help="skip the second process that checks that Numba's "
                   "cache spares it the compilation")
    p.add_argument("--all", metavar="OUTDIR", help="gpu: every GPU check (CUDA tests on the card, copy bandwidth, "
                   "launch overhead, every kernel version vs cuDNN, a U-Net step), results written to OUTDIR after "
                   "every case (see benchmarks/gpu.py)")
    p.add_argument("--simulate", action="store_true", help="gpu: the same run on the CPU under Numba's CUDA "
                   "simulator, tiny shapes (checks that the GPU run cannot fail for a CPU-visible reason)")
    p.add_argument("--sections", help="gpu: comma-separated subset of machine,tests,copy,launch,kernels,train")
    p.add_argument("--budget", type=float, default=345.0, help="gpu: seconds for all sections together (default "
                   "345), shared in benchmarks/gpu.py's proportions")
    p.add_argument("--plot", metavar="FILE.png", help="ops/train: also draw bars of x torch and of %% of the measured "
                   "FP32 peak or memory bandwidth per case to FILE.png (Pillow)")
    p.add_argument("--conv-versions", metavar="K,K", help="train: also time the step with the cpu backend's conv2d "
                   "kernels at these numbered versions ('cpu vK' rows; ops times every version in its conv cases)")
    p.add_argument("--no-capture", action="store_true", help="train: leave out the 'cpu captured' row (the cpu "
                   "backend's step recorded once and replayed, minseg/capture.py)")
    p.add_argument("--layers", action="store_true", help="ops: time every conv layer of the benchmark U-Net (forward + "
                   "the gradients a training step needs) instead of the op cases; use --backends cpu")
    p.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)  # the cache check's child
    p.add_argument("--memory-child", metavar="LABEL", help=argparse.SUPPRESS)  # train: one library's step memory
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else None
    args.sections = [t.strip() for t in args.sections.split(",") if t.strip()] if args.sections else None
    try:
        args.conv_versions = [int(v) for v in args.conv_versions.split(",") if v.strip()] if args.conv_versions else None
    except ValueError:
        p.error(f"--conv-versions takes comma-separated integers, got {args.conv_versions!r}")
    if args.repeat is None:
        args.repeat = QUICK_REPEAT if args.quick else DEFAULT_REPEAT[args.mode]
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeat < 1 or args.warmup < 1:
        p.error("--repeat and --warmup must be >= 1")
    return args


def _child_env(env: dict) -> dict:
    """``env`` with this checkout on PYTHONPATH, so ``-m benchmarks`` imports the same code."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def _reexec_if_needed(args, argv) -> None:
    """Re-execute this command in a changed environment when a flag asks for one.

    ops and train always run with OpenBLAS's idle threads quieted (machine.QUIET_BLAS_THREADS).
    OpenBLAS reads OPENBLAS_* and glibc reads MALLOC_* once, at load, so
    the only way to change them is a new process. The new process finds the
    environment already changed and runs the benchmark.
    """
    env, changes = dict(os.environ), []
    if args.mode in ("ops", "train"):
        for key, value in machine.QUIET_BLAS_THREADS.items():
            if env.get(key) != value:
                env[key] = value
                changes.append(f"{key}={value} (idle BLAS threads sleep at once: see benchmarks/machine.py)")
    if args.unset_openblas_coretype:
        for key in machine.OPENBLAS_OVERRIDES:
            if key in env:
                changes.append(f"unset {key} (was {env.pop(key)})")
    if args.malloc_tune:
        for key, value in machine.MALLOC_TUNE.items():
            if env.get(key) != value:
                env[key] = value
                changes.append(f"{key}={value}")
    if changes:
        print(f"re-executing with {', '.join(changes)}", flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], _child_env(env))


def load_libs(args):
    """The implementations to compare, in the order they run: minseg backends, then torch."""
    from .cases import MinsegLib, TorchLib

    libs, skipped, imports = [], {}, {}
    for name in args.backends:
        meter = CompileMeter()
        t0 = time.perf_counter()
        try:
            lib = metered(lambda: MinsegLib(name), meter)
        except Exception as e:  # a backend still being written, or no GPU
            skipped[name] = f"backend does not load: {type(e).__name__}: {e}"
            continue
        imports[name] = dict(seconds=time.perf_counter() - t0, numba_compile_s=meter.seconds, numba_compiles=meter.count)
        libs.append(lib)
    if not args.no_torch:
        try:
            libs.append(TorchLib("cpu"))
        except ImportError:
            skipped["torch"] = "torch is not installed (pip install torch==2.13.0)"
    return libs, skipped, imports


def build_cases(args, libs):
    """(cases, facts): the op cases, or the training step and facts about its model."""
    if args.mode == "ops":
        from .cases import op_cases

        return op_cases(libs, "quick" if args.quick else "full", args.layers), {}
    from .cases import CapturedCpuLib, conv_version_libs
    from .train import train_case

    labels = [lib.label for lib in libs]
    if "cpu" in labels and not args.no_capture:  # the same step recorded and replayed (minseg/capture.py)
        libs.insert(labels.index("cpu") + 1, CapturedCpuLib())
    if args.conv_versions:
        libs[:] = conv_version_libs(libs, args.conv_versions)  # the step profile walks the same list
    case, facts = train_case(libs, "quick" if args.quick else "full")
    return [case], facts


def select(cases, only):
    """The cases whose name contains one of the strings in ``only`` (all when None)."""
    return cases if not only else [c for c in cases if any(t in c.name for t in only)]


def first_calls(cases) -> dict:
    """The cache check's child: one metered call of every implementation."""
    out = {}
    for case in cases:
        out[case.name] = {}
        for impl in case.impls:
            impl.reset()
            meter = CompileMeter()
            try:
                seconds, _, _ = metered(lambda: impl.clock(impl.run), meter)
            except Exception as e:  # reported by the main process's table too
                out[case.name][impl.name] = dict(error=f"{type(e).__name__}: {e}")
                continue
            out[case.name][impl.name] = dict(first_call_s=seconds, numba_compile_s=meter.seconds, numba_compiles=meter.count)
    return out


def cache_check_command(args, path: str) -> list[str]:
    """The cache check's child: the same mode and the same cases as this run (``--quick``, ``--only``,
    ``--layers``, ``--conv-versions``), cpu only, writing its first calls to ``path``."""
    cmd = [sys.executable, "-m", "benchmarks", args.mode, "--first-call-only", "--backends", "cpu", "--no-torch",
           "--threads", str(args.threads), "--json", path] + (["--quick"] if args.quick else [])
    cmd += ["--only", ",".join(args.only)] if args.only else []
    cmd += ["--layers"] if args.layers else []
    cmd += ["--conv-versions", ",".join(map(str, args.conv_versions))] if args.conv_versions else []
    return cmd


def cache_check(args) -> dict:
    """Run the same cases' first calls of the 'cpu' backend in a fresh process.

    Numba's ``cache=True`` writes compiled kernels to disk (``__pycache__``); a
    second process must load them instead of compiling: 0 compilations there.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "first_calls.json")
        cmd = cache_check_command(args, path)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_child_env(os.environ), capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return dict(error=f"second process failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        with open(path) as f:
            child = json.load(f)
    child["process_wall_s"] = wall
    return child


def memory_in_child(args, label: str) -> dict:
    """``train.step_memory`` of library ``label`` alone, in a fresh process (the RSS of this one
    holds every library's model and what its allocator kept)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        if label == "torch":
            peer = ["--backends", ""]
        elif label == "cpu captured":  # a CapturedCpuLib: its child builds the cpu libraries, this one too
            peer = ["--backends", "cpu", "--no-torch"]
        elif label.startswith("cpu v"):  # a CpuConvVersionLib
            peer = ["--backends", "cpu", "--no-torch", "--conv-versions", label[len("cpu v"):]]
        else:
            peer = ["--backends", label, "--no-torch"]
        cmd = [sys.executable, "-m", "benchmarks", "train", "--memory-child", label, *peer, "--threads", str(args.threads),
               "--warmup", str(args.warmup), "--json", path] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=_child_env(os.environ), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            return dict(error=f"child process failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        with open(path) as f:
            return json.load(f)


def cache_lines(check: dict) -> list[str]:
    if "error" in check:
        return [f"cache check: {check['error']}"]
    imp = check["imports"].get("cpu", {})
    calls = [r for case in check["cases"].values() for r in case.values() if "error" not in r]
    compiles = imp.get("numba_compiles", 0) + sum(r["numba_compiles"] for r in calls)
    seconds = imp.get("numba_compile_s", 0.0) + sum(r["numba_compile_s"] for r in calls)
    verdict = "OK, every kernel came from the cache" if compiles == 0 else "Numba RECOMPILED: a kernel lacks cache=True or its cache is invalid"
    lines = [
        f"cache check (second process, backend 'cpu'): {compiles} Numba compilations, {seconds:.2f} s compiling; "
        f"backend import {imp.get('seconds', 0.0):.2f} s; whole process {check['process_wall_s']:.1f} s -- {verdict}"
    ]
    for name, case in check["cases"].items():
        for impl, r in case.items():
            if "error" in r:
                lines.append(f"  {name} [{impl}]: first call raised {r['error']}")
            else:
                lines.append(f"  {name} [{impl}]: first call {r['first_call_s'] * 1e3:.1f} ms, {r['numba_compiles']} compilations")
    return lines


def summary_lines(entries, imports, facts) -> list[str]:
    lines = []
    for name, imp in imports.items():
        lines.append(
            f"backend '{name}' import: {imp['seconds']:.2f} s, Numba compiled {imp['numba_compiles']} functions "
            f"({imp['numba_compile_s']:.2f} s) while importing"
        )
    for name in imports:
        runs = [e["results"][name] for e in entries if name in e["results"]]
        count, seconds = sum(r["numba_compiles"] for r in runs), sum(r["numba_compile_s"] for r in runs)
        lines.append(f"backend '{name}' first calls: Numba compiled {count} functions in {seconds:.2f} s "
                     f"(first-median summed: {sum(r['first_minus_median_s'] for r in runs):.2f} s)")
    for e in entries:
        for impl, r in e["results"].items():
            if r["later_numba_compiles"]:
                lines.append(f"WARNING {e['case']} [{impl}]: Numba compiled {r['later_numba_compiles']} functions after "
                             "the first call (a new signature?): those calls' times include compilation")
            if not r["rel_err"] <= REL_ERR_WARN:
                lines.append(f"WARNING {e['case']} [{impl}]: relative error {r['rel_err']:.2e} vs {e['reference']} "
                             f"(> {REL_ERR_WARN:g}): it does not compute the same thing")
    if facts:
        lines.append(
            f"U-Net: channels {facts['channels']}, batch {facts['batch']}, {facts['image']}x{facts['image']} images, "
            f"SGD {facts['sgd']}; parameters {facts['params']}"
            + (f"; {facts['conv_gflop_per_step']:.2f} GFLOP of convolutions per step" if facts.get("conv_gflop_per_step") else "")
        )
    lines.append(
        "columns: median and min-max of the timed calls; x torch = minseg median / torch median; first-median = "
        "first call minus median (Numba compilation or cache load, allocations); jit s = time Numba spent compiling "
        "in the first call (functions compiled); faults/call = minor page faults per call (fresh memory); "
        f"rel err = ||out - ref|| / ||ref|| over output and gradients, ref = {entries[0]['reference'] if entries else '-'}"
    )
    return lines


def run_cpu(args, argv) -> int:
    args.threads = args.threads or machine.usable_cores()
    threads = machine.set_threads(args.threads)
    libs, skipped, imports = load_libs(args)
    if not libs:
        print("nothing to benchmark: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        return 1
    cases, facts = build_cases(args, libs)
    cases = select(cases, args.only)

    if args.first_call_only:
        result = dict(imports=imports, cases=first_calls(cases))
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        return 0
    if args.memory_child:
        from .train import step_memory, train_case

        # One step of the small quick-size model first: it loads (or compiles) every kernel and
        # creates the library's per-op state, which would otherwise count as a step's memory.
        warm, _ = train_case(libs, "quick")
        next(impl for impl in warm.impls if impl.name == args.memory_child).run()
        del warm
        impl = next(impl for impl in cases[0].impls if impl.name == args.memory_child)
        capture = None
        if hasattr(impl, "captured"):  # its first call captures (eager, recorded, validated steps): once, apart
            capture = step_memory(impl, 1)
        result = step_memory(impl, args.warmup + 1)
        if capture is not None:
            result["capture_peak_rss_mib"], result["capture_mib"] = capture["peak_rss_mib"], capture["step_mib"]
        with open(args.json, "w") as f:
            json.dump(result, f)
        return 0

    print("measuring the machine's FP32 peak and memory bandwidth ...", file=sys.stderr, flush=True)
    limits = machine.limits("quick" if args.quick else "full")
    entries = []
    t_start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name} ({', '.join(m.name for m in case.impls)}) "
              f"at {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
        entries.append(measure(case, args.repeat, args.warmup))
    add_limits(entries, limits)
    profile = None
    if args.mode == "train":
        from .train import step_profile

        print("step profile: memory and time outside kernels ...", file=sys.stderr, flush=True)
        profile = step_profile(cases[0], libs, args.repeat, lambda label: memory_in_child(args, label)) if cases else None

    info = machine.describe(threads)  # after the runs: Numba's threading layer is known once a kernel ran
    notes = machine.notes(info)
    if args.unset_openblas_coretype:
        notes.append("--unset-openblas-coretype: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE were removed before numpy loaded.")
    check = None
    if "cpu" in imports and not args.no_cache_check:
        print("cache check: running the first calls again in a new process ...", file=sys.stderr, flush=True)
        check = cache_check(args)

    print(f"minseg benchmarks: {args.mode}{' (quick)' if args.quick else ''}, {args.repeat} timed calls after "
          f"{args.warmup} warm-up, interleaved")
    for line in machine.header_lines(info) + machine.limit_lines(limits):
        print(line)
    for note in notes:
        print(f"NOTE: {note}")
    for name, why in skipped.items():
        print(f"skipped      {name}: {why}")
    print()
    print(table(entries))
    print()
    for line in summary_lines(entries, imports, facts):
        print(line)
    if any(name.startswith("cpu v") for e in entries for name in e["results"]):
        from .cases import conv_version_line

        print(conv_version_line())
    if profile:
        from .train import profile_lines

        for line in profile_lines(profile):
            print(line)
    if check is not None:
        for line in cache_lines(check):
            print(line)
    if args.json:
        report = dict(mode=args.mode, quick=args.quick, repeat=args.repeat, warmup=args.warmup, argv=list(argv),
                      machine=info, notes=notes, backend_imports=imports, skipped=skipped, model=facts or None,
                      cases=entries, cache_check=check, limits=limits, step_profile=profile)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"JSON written to {args.json}")
    if args.plot:
        from .plot import draw

        title = f"minseg {args.mode}{' (quick)' if args.quick else ''}, {info['date_utc']} UTC, {args.threads} threads"
        draw(entries, limits, args.plot, title, profile)
        print(f"plot written to {args.plot}")
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m benchmarks`` and ``minseg bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _reexec_if_needed(args, argv)
    if args.mode == "gpu":
        from .gpu import run_gpu

        return run_gpu(args, argv)
    if args.mode == "ddp":
        from .ddp import run_ddp

        return run_ddp(args, argv)
    return run_cpu(args, argv)


if __name__ == "__main__":
    sys.exit(main())
