"""``python -m benchmarks ddp``: data-parallel training on this machine, and what it predicts for clusters.

Two runs of the same U-Net training step (issue 4's default net, global batch 8):

* world 1: one process with all usable cores as threads;
* world 2: ``mpiexec -n 2`` ranks with half the cores each, batch 4 per rank,
  SyncBatchNorm2d and the bucketed gradient all-reduce (minseg.distributed).

Each step is timed between two barriers (so it includes waiting for the slower
rank); each gradient bucket's all-reduce is timed on its own, giving the
all-reduce time and bytes per step and their share of the step (the target is
<= 5 %). The synchronised batch norm's small all-reduces are inside the step time.

Cost model for W machines (printed with the table, so RESULTS.md can quote it): a
ring all-reduce sends and receives 2 (W - 1) / W times the buffer per rank, so

    t_allreduce(W) = 2 (W - 1) / W * bytes / bandwidth          (latency ignored)
    t_step(W)      = t_compute + t_allreduce(W)                  (no overlap)

with t_compute = the measured world-2 step minus its measured all-reduce time,
i.e. per-rank batch 4 (weak scaling: the global batch grows with W).

``python -m benchmarks.ddp worker ...`` is the process that measures (one per rank).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from .train import SGD, TRAIN_SIZES

MACHINES = (8, 64)
NETWORKS_GBIT = (10, 100)
TARGET_SHARE = 0.05


def worker(argv) -> int:
    """One rank: time ``repeat`` training steps after ``warmup``; rank 0 writes the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp worker")
    p.add_argument("--size", choices=list(TRAIN_SIZES), default="full")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    import numba

    from minseg import backend, distributed, manual_seed, tensor
    from minseg.nn import UNet
    from minseg.optim import SGD as MinsegSGD

    backend.set_backend(args.backend)
    world = distributed.init()  # threads: NUMBA_NUM_THREADS and the BLAS variables, set by run_ddp
    s = TRAIN_SIZES[args.size]
    if s["batch"] % world.size:
        raise SystemExit(f"the global batch {s['batch']} does not split over {world.size} ranks")
    per_rank = s["batch"] // world.size
    rng = np.random.default_rng(0)  # the global batch; each rank takes its block
    x = rng.standard_normal((s["batch"], s["in_channels"], s["image"], s["image"])).astype(np.float32)
    t = rng.integers(0, s["num_classes"], (s["batch"], s["image"], s["image"])).astype(np.int64)
    part = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    X, T = tensor(x[part]), tensor(t[part])
    manual_seed(0)
    model = UNet(in_channels=s["in_channels"], num_classes=s["num_classes"], base_channels=s["base_channels"], depth=s["depth"])
    if world.size > 1:
        model = distributed.convert_sync_batchnorm(model)
    distributed.broadcast_parameters(model)
    opt = distributed.DistributedOptimizer(MinsegSGD(model.parameters(), **SGD))
    buckets = []  # (bytes, seconds) of every bucket all-reduce of the current step

    @contextlib.contextmanager
    def bucket_timer(nbytes):
        t0 = time.perf_counter()
        yield
        buckets.append((nbytes, time.perf_counter() - t0))

    steps = []
    for i in range(args.warmup + args.repeat):
        buckets.clear()
        world.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = distributed.cross_entropy(model(X), T)
        loss.backward()
        opt.reducer.reduce(bucket_timer if world.size > 1 else None)
        opt.optimizer.step()
        world.barrier()
        if i >= args.warmup:
            steps.append(dict(step_s=time.perf_counter() - t0, buckets=list(buckets)))
    if world.rank == 0:
        report = dict(world=world.size, threads=numba.get_num_threads(), per_rank_batch=per_rank, size=args.size,
                      backend=args.backend, params=model.num_parameters(),
                      bucket_bytes=opt.reducer.bucket_nbytes(), steps=steps)
        with open(args.json, "w") as f:
            json.dump(report, f)
    return 0


def _summary(report) -> dict:
    step = float(np.median([s["step_s"] for s in report["steps"]]))
    reduce_s = float(np.median([sum(t for _, t in s["buckets"]) for s in report["steps"]]))
    per_bucket = [float(np.median([s["buckets"][k][1] for s in report["steps"]])) for k in range(len(report["bucket_bytes"]))] \
        if report["world"] > 1 else []
    return dict(step_s=step, allreduce_s=reduce_s, share=reduce_s / step, bytes=sum(report["bucket_bytes"]),
                per_bucket_s=per_bucket)


def cost_model(compute_s: float, nbytes: int) -> list[dict]:
    """Predicted step times for W machines on a ring all-reduce (module docstring), no overlap."""
    rows = []
    for w in MACHINES:
        for gbit in NETWORKS_GBIT:
            reduce_s = 2 * (w - 1) / w * nbytes / (gbit * 1e9 / 8)
            rows.append(dict(machines=w, gbit_s=gbit, allreduce_s=reduce_s, step_s=compute_s + reduce_s,
                             share=reduce_s / (compute_s + reduce_s)))
    return rows


def _run(cmd, env, timeout):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")


def _header(cores) -> list[str]:
    """What ran where (machine.describe without torch, which this mode does not use)."""
    import numba

    import minseg

    from . import machine

    load = os.getloadavg()[0]
    lines = [
        f"date (UTC)   {machine.utc_now()}",
        f"CPU          {machine.cpu_model()}  [{' '.join(machine.cpu_flags())}]",
        f"cores        {cores} used of {machine.usable_cores()} usable; load average {load:.2f}",
        f"versions     python {sys.version.split()[0]}, numpy {np.__version__}, numba {numba.__version__}, minseg {minseg.__version__}",
    ]
    if load > 0.5 * cores:
        lines.append(f"NOTE: load average {load:.2f} on {cores} cores: other work is running, timings are noisy.")
    return lines


def run_ddp(args, argv) -> int:
    from . import machine
    from .__main__ import _child_env

    cores = args.threads or machine.usable_cores()
    size = "quick" if args.quick else "full"
    backend_name = "cpu" if "cpu" in args.backends else args.backends[0]
    common = ["--size", size, "--backend", backend_name, "--repeat", str(args.repeat), "--warmup", str(args.warmup)]
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.access(mpiexec, os.X_OK):
        from shutil import which

        mpiexec = which("mpiexec")
    try:
        import mpi4py  # noqa: F401

        missing = None if mpiexec else "mpiexec not found"
    except ImportError:
        missing = "mpi4py is not installed (pip install -e '.[distributed]')"
    env = _child_env(os.environ)  # the children (and mpiexec's ranks) import this checkout
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        env.pop(name, None)
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(1, cores, [sys.executable, "-m", "benchmarks.ddp", "worker"])]
        if missing is None:
            runs.append((2, max(1, cores // 2), [mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "benchmarks.ddp", "worker"]))
        for world, threads, cmd in runs:
            path = os.path.join(tmp, f"world{world}.json")
            print(f"world {world}: {world} x {threads} threads ...", file=sys.stderr, flush=True)
            threads_env = {k: str(threads) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
            _run(cmd + common + ["--json", path], {**env, **threads_env}, timeout=1800)
            with open(path) as f:
                reports[world] = json.load(f)
    summaries = {w: _summary(r) for w, r in reports.items()}

    print(f"minseg benchmarks: ddp{' (quick)' if args.quick else ''}, {args.repeat} timed steps after {args.warmup} "
          f"warm-up, backend {backend_name}, U-Net {size} (global batch {TRAIN_SIZES[size]['batch']})")
    for line in _header(cores):
        print(line)
    if missing:
        print(f"skipped      world 2: {missing}")
    print()
    print(f"{'run':<28}{'step (median)':>15}{'all-reduce/step':>17}{'share':>8}{'bytes/step':>12}{'buckets':>9}")
    for w, s in summaries.items():
        r = reports[w]
        label = f"{w} x {r['threads']} threads, batch {r['per_rank_batch']}"
        print(f"{label:<28}{s['step_s'] * 1e3:>12.1f} ms{s['allreduce_s'] * 1e3:>14.2f} ms{100 * s['share']:>7.1f}%"
              f"{s['bytes'] if w > 1 else 0:>12,}{len(r['bucket_bytes']) if w > 1 else 0:>9}")
    result = dict(mode="ddp", quick=args.quick, argv=list(argv), runs=reports, summaries=summaries, skipped=missing)
    if 2 in summaries:
        s1, s2 = summaries[1], summaries[2]
        print()
        print("per bucket: " + ", ".join(f"{b:,} B {t * 1e3:.3f} ms" for b, t in zip(reports[2]["bucket_bytes"], s2["per_bucket_s"])))
        print(f"speed-up world 2 / world 1: {s1['step_s'] / s2['step_s']:.2f}x; all-reduce share {100 * s2['share']:.1f}% "
              f"(target <= {100 * TARGET_SHARE:.0f}%: {'met' if s2['share'] <= TARGET_SHARE else 'NOT met'})")
        compute = s2["step_s"] - s2["allreduce_s"]
        model = cost_model(compute, s2["bytes"])
        result["cost_model"] = dict(compute_s=compute, bytes=s2["bytes"], rows=model)
        print(f"\ncost model (ring all-reduce, no overlap, latency ignored): compute {compute * 1e3:.1f} ms per rank "
              f"(batch {reports[2]['per_rank_batch']}), {s2['bytes']:,} gradient bytes")
        print(f"{'machines':>9}{'network':>12}{'all-reduce':>13}{'step':>11}{'share':>8}")
        for row in model:
            print(f"{row['machines']:>9}{row['gbit_s']:>8} Gb/s{row['allreduce_s'] * 1e3:>10.2f} ms"
                  f"{row['step_s'] * 1e3:>8.1f} ms{100 * row['share']:>7.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: python -m benchmarks ddp [options]  (python -m benchmarks.ddp worker ... is the per-rank process)")
    sys.exit(worker(sys.argv[2:]))
