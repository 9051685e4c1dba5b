"""``python -m benchmarks gpu``: the cuda backend against torch CUDA (cuDNN) on the same card.

What it times, each case interleaved with torch after warm-up, with CUDA events:

* the op cases of ``cases.py`` at issue 3's realistic sizes (batch 16, 64-128
  channels, 128x128 images), through ``minseg.functional`` on CuPy arrays --
  what a user gets, Python overhead and all;
* every numbered version of the conv2d forward kernel
  (``kernels/conv2d/cuda.py: FORWARD_VERSIONS``) called directly on device
  arrays, against cuDNN's forward: the ratio per version is the speed won;
* the fused cross-entropy kernels (forward + backward) called directly, with
  the bandwidth they achieve -- the fewest bytes they must move over their
  time -- next to the card's measured device-to-device copy bandwidth.

torch runs in plain float32: TF32 (which cuDNN would otherwise use for
convolutions, with a 10-bit mantissa) is switched off, so both sides do the
same arithmetic; ``cudnn.benchmark`` lets cuDNN pick its fastest algorithm.
Without a GPU this prints one line saying so and exits 0.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from . import machine
from .cases import MinsegLib, OpSpec, TorchLib, build_case, cross_entropy_bytes, op_specs
from .timing import Case, Impl, measure, table

CONV_PAD = ((1, 1), (1, 1))  # kernel-level padding argument: 3x3 'same'


def cupy_clock(fn):
    """Device time of fn() between two CUDA events on the default stream (Numba and CuPy launch there)."""
    import cupy

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3, None, out


def torch_clock(fn):
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, None, out


def copy_bandwidth(nbytes: int = 1 << 30, repeat: int = 20) -> float:
    """The card's device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median)."""
    import cupy

    src = cupy.random.random(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    times = []
    for i in range(repeat + 2):
        seconds, _, _ = cupy_clock(lambda: dst.data.copy_from_device_async(src.data, src.nbytes))
        if i >= 2:
            times.append(seconds)
    if not bool((dst == src).all()):
        raise RuntimeError("device-to-device copy check failed")
    return 2 * src.nbytes / float(np.median(times))


def gpu_info() -> dict:
    import cupy
    import numba_cuda

    try:
        from numba.cuda.core import config as cuda_config
    except ImportError:  # older numba-cuda keeps it in numba's config
        from numba import config as cuda_config
    props = cupy.cuda.runtime.getDeviceProperties(0)
    info = dict(
        name=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        multiprocessors=props["multiProcessorCount"],
        memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
        l2_mib=round(props["l2CacheSize"] / 2**20, 1),
        compute_capability=f"{props['major']}.{props['minor']}",
        driver=cupy.cuda.runtime.driverGetVersion(),
        runtime=cupy.cuda.runtime.runtimeGetVersion(),
        cupy=cupy.__version__,
        numba_cuda=getattr(numba_cuda, "__version__", "?"),
        cai_sync=bool(getattr(cuda_config, "CUDA_ARRAY_INTERFACE_SYNC", True)),
    )
    try:
        import torch

        info.update(torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                    torch_tf32=bool(torch.backends.cudnn.allow_tf32), cudnn_benchmark=bool(torch.backends.cudnn.benchmark))
    except ImportError:
        pass
    return info


def _kernel_conv_cases(libs, versions, size):
    """Each conv2d forward version on raw device arrays, against cuDNN's forward."""
    import cupy

    cases = []
    for spec in op_specs(size):
        if not spec.name.startswith("conv2d 3x3 fwd ") or spec.backward:
            continue
        x, w, b = (spec.inputs[k] for k in ("x", "w", "b"))
        impls = []
        for lib in libs:
            if isinstance(lib, MinsegLib):
                xd, wd, bd = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
                for v, fn in versions.items():

                    def run(fn=fn, xd=xd, wd=wd, bd=bd):
                        return [fn(xd, wd, bd, (1, 1), CONV_PAD, (1, 1), 1)]

                    impls.append(Impl(f"cuda v{v}", run, cupy.asnumpy, clock=cupy_clock))
            else:
                xt, wt, bt = lib.tensor(x), lib.tensor(w), lib.tensor(b)

                def run(xt=xt, wt=wt, bt=bt, F=lib.F, torch=lib.torch):
                    with torch.no_grad():
                        return [F.conv2d(xt, wt, bt, padding=1)]

                impls.append(Impl("torch", run, lib.to_numpy, clock=torch_clock))
        name = spec.name.replace("conv2d 3x3 fwd", "conv2d 3x3 fwd kernel")
        cases.append(Case(name, impls, spec.flops))
    return cases


def _kernel_xent_case(libs, K, size):
    """The fused cross-entropy forward + backward kernels on raw device arrays (mean reduction)."""
    import cupy

    spec = next(s for s in op_specs(size) if s.name.startswith("cross_entropy"))
    logits, target = spec.inputs["logits"], spec.inputs["target"]
    n, c, h, w = logits.shape
    impls = []
    for lib in libs:
        if isinstance(lib, MinsegLib):
            ld = cupy.asarray(logits.reshape(n, c, h * w))
            td = cupy.asarray(target.reshape(n, h * w))
            gloss = cupy.ones((), dtype=cupy.float32)

            def run(ld=ld, td=td, gloss=gloss):
                loss, lse = K.cross_entropy_forward(ld, td, None, -100, "mean", 0.0)
                return [loss, K.cross_entropy_backward(ld, td, None, -100, "mean", 0.0, lse, gloss)]

            impls.append(Impl("cuda kernels", run, cupy.asnumpy, clock=cupy_clock))
        else:
            lt, tt = lib.tensor(logits, requires_grad=True), lib.tensor(target)

            def run(lt=lt, tt=tt, F=lib.F):
                loss = F.cross_entropy(lt, tt)
                loss.backward()
                return [loss, lt.grad.reshape(n, c, h * w)]

            def reset(lt=lt):
                lt.grad = None

            impls.append(Impl("torch", run, lib.to_numpy, reset, clock=torch_clock))
    name = spec.name.replace("cross_entropy fwd+bwd", "cross_entropy kernels fwd+bwd")
    return Case(name, impls, None, cross_entropy_bytes(n, c, h, w))


def run_gpu(args, argv) -> int:
    from minseg import backend

    status = backend.cuda_status()
    if status != "gpu":
        print(f"no GPU: the gpu benchmarks need a CUDA GPU and CuPy ({status}); nothing to time.")
        return 0
    import cupy

    skipped = {}
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA here")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        peer = [] if args.no_torch else [TorchLib("cuda")]
    except ImportError as e:
        peer, skipped["torch"] = [], f"no torch CUDA peer: {e}"
    try:
        libs = [MinsegLib("cuda")] + peer
    except Exception as e:
        print(f"the cuda backend does not load: {type(e).__name__}: {e}")
        return 1
    K = backend.load("cuda")
    conv_module = __import__("kernels.conv2d.cuda", fromlist=["FORWARD_VERSIONS"])
    versions = getattr(conv_module, "FORWARD_VERSIONS", {1: conv_module.conv2d_forward})

    size = "quick" if args.quick else "gpu"
    cases = [
        build_case(spec.name, libs, lambda lib, s=spec: _op_impl(s, lib), spec.flops, spec.nbytes) for spec in op_specs(size)
    ]
    cases += _kernel_conv_cases(libs, versions, size)
    cases.append(_kernel_xent_case(libs, K, size))
    cases = [c for c in cases if not args.only or any(t in c.name for t in args.only)]

    copy_bw = copy_bandwidth()
    entries = []
    t_start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name} at {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
        entries.append(measure(case, args.repeat, args.warmup))
        cupy.get_default_memory_pool().free_all_blocks()

    info = dict(gpu=gpu_info(), host=machine.cpu_model(), copy_bandwidth_gb_s=copy_bw / 1e9, date_utc=machine.utc_now())
    lines = targets(entries, copy_bw)
    print(f"minseg gpu benchmarks: {args.repeat} timed calls after {args.warmup} warm-up, interleaved, CUDA events")
    g = info["gpu"]
    print(f"GPU          {g['name']} (sm {g['compute_capability']}, {g['multiprocessors']} SMs, {g['memory_gib']} GiB, "
          f"L2 {g['l2_mib']} MiB), driver {g['driver']}, runtime {g['runtime']}")
    print(f"software     cupy {g['cupy']}, numba-cuda {g['numba_cuda']}, torch {g.get('torch', '-')} cuDNN {g.get('cudnn', '-')} "
          f"(TF32 {'on' if g.get('torch_tf32') else 'off'}, cudnn.benchmark {g.get('cudnn_benchmark')})")
    print(f"host         {info['host']}, {info['date_utc']} UTC")
    print(f"copy         device-to-device {copy_bw / 1e9:.0f} GB/s (bytes read + written)")
    if g["cai_sync"]:
        print("NOTE: NUMBA_CUDA_ARRAY_INTERFACE_SYNC is on: Numba synchronizes the stream that CuPy exports with each "
              "array argument before every launch, so each kernel launch waits for the GPU (host-side stalls count "
              "in the minseg times)")
    for name, why in skipped.items():
        print(f"skipped      {name}: {why}")
    print()
    print(table(entries))
    print()
    for line in lines:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(mode="gpu", repeat=args.repeat, warmup=args.warmup, argv=list(argv), machine=info,
                           cases=entries, targets=lines), f, indent=1)
        print(f"JSON written to {args.json}")
    return 0


def _op_impl(spec: OpSpec, lib) -> Impl:
    from .cases import op_impl

    impl = op_impl(spec, lib)
    impl.clock = cupy_clock if isinstance(lib, MinsegLib) else torch_clock
    return impl


def targets(entries, copy_bw) -> list[str]:
    """Issue 3's targets: conv forward >= 25% of cuDNN per version, fused cross-entropy >= 70% of copy bandwidth."""
    lines = []
    for e in entries:
        r = e["results"]
        if "conv2d 3x3 fwd kernel" in e["case"] and "torch" in r:
            for impl, v in r.items():
                if impl != "torch":
                    share = r["torch"]["median_s"] / v["median_s"]
                    lines.append(f"{e['case']} {impl}: {share:.0%} of cuDNN's speed (target >= 25%)")
        if e["case"].startswith("cross_entropy kernels") and "cuda kernels" in r:
            bw = r["cuda kernels"]["gbytes_per_s"] * 1e9
            lines.append(f"{e['case']}: {bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of the copy bandwidth (target >= 70%)")
        for impl, v in r.items():
            if not v["rel_err"] <= 1e-3:
                lines.append(f"WARNING {e['case']} [{impl}]: relative error {v['rel_err']:.2e} vs {e['reference']}")
    return lines
