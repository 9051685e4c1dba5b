"""What the numbers ran on: CPU, cores, BLAS libraries and their kernels, thread counts.

A ratio to PyTorch only means something with this context: numpy's OpenBLAS and
torch's MKL/oneDNN are different libraries, each picks a kernel for the CPU at
load time (OpenBLAS's choice can be overridden with ``OPENBLAS_CORETYPE``), and
both run on as many threads as they are told.
"""
from __future__ import annotations

import datetime
import os
import platform
import re

# Environment variables that change what the timed code does; they are printed
# with every run so a table can be reproduced.
REPORTED_ENV = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
    "NUMBA_CPU_NAME",
    "NUMBA_CPU_FEATURES",
    "NUMBA_CACHE_DIR",
    "NUMBA_ENABLE_CUDASIM",
    "MINSEG_BACKEND",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "OPENBLAS_THREAD_TIMEOUT",
)

# ops and train always set this (a re-exec when it is not set yet). OpenBLAS's idle threads spin
# for about 2^28 cycles (~0.1 s) after a call before they sleep: the numpy backend's matmuls left
# them spinning on the other core through the next implementation's timed call (measured here: the
# first cpu U-Net step after a numpy one took 104-149 ms instead of ~43 ms, every kernel 2-4x slower).
# At 2^4 cycles they sleep at once; the numpy backend is the reference, not a competitor.
QUIET_BLAS_THREADS = {"OPENBLAS_THREAD_TIMEOUT": "4"}

# --unset-openblas-coretype removes these before numpy loads OpenBLAS (a re-exec).
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# --malloc-tune: glibc hands out allocations above the mmap threshold (128 KiB at
# start, adapting up to 32 MiB) as fresh mmaps, and returns freed memory at the top
# of the heap to the OS above the trim threshold. Either way the next large array
# is new memory, and every 4 KiB page of it faults on first touch. Raising both
# keeps freed blocks in the heap for reuse, for minseg and torch alike (one process).
MALLOC_TUNE = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD extensions that decide which GEMM kernels can run."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    return []


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_limit() -> str | None:
    """The container's CPU quota ('max' = none), which can be below the visible cores."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        return "none" if quota == "max" else f"{int(quota) / int(period):g} CPUs"
    except (OSError, ValueError):
        return None


def set_threads(n: int) -> dict:
    """Give torch, Numba and every BLAS/OpenMP pool found by threadpoolctl ``n`` threads.

    Returns what each library reports afterwards. The threadpoolctl limiter is
    kept on the returned dict so the limit lasts as long as the run.
    """
    import numba

    try:
        # np.dot / @ inside @njit code calls scipy's BLAS (scipy.linalg.cython_blas), a
        # second OpenBLAS beside numpy's; load it now so that the limit below reaches it.
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError:
        pass
    got = {"requested": n}
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    got["numba"] = numba.get_num_threads()
    try:
        import torch

        torch.set_num_threads(n)
        got["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        got["_limiter"] = threadpool_limits(limits=n)
    except ImportError:
        got["threadpoolctl"] = "not installed (pip install threadpoolctl): BLAS threads not set"
    return got


def threadpools() -> list[dict]:
    """Every native thread pool loaded in the process (BLAS and OpenMP), per threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "threading_layer", "num_threads", "filepath")
    pools = [{k: info.get(k) for k in keys} for info in threadpool_info()]
    for p in pools:
        p["owner"] = _owner(p["filepath"] or "")
    return pools


def _owner(path: str) -> str:
    """Which package shipped a native library, from its install path."""
    owners = {
        "numpy.libs": "numpy",
        "scipy.libs": "scipy (np.dot in Numba code)",
        "torch/lib": "torch",
        "numba": "numba",
    }
    for key, owner in owners.items():
        if f"/{key}/" in path or f"/{key}" in os.path.dirname(path):
            return owner
    return "system"


def torch_info() -> dict | None:
    """torch's own math libraries: its BLAS (MKL on x86 builds) and oneDNN, which runs its convs."""
    try:
        import torch
    except ImportError:
        return None
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([^\n]+)", config)
    onednn = re.search(r"MKL-DNN v([\w.]+)", config)
    info = {
        "version": torch.__version__,
        "blas": blas.group(1) if blas else "unknown",
        "mkl": mkl.group(1).strip() if mkl else None,
        "onednn": onednn.group(1) if onednn else None,
        "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
        "parallel_info": torch.__config__.parallel_info().strip().splitlines()[:6],
    }
    return info


def numba_threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        return "not started (no parallel kernel ran)"


def describe(threads: dict) -> dict:
    """Everything the header of a table prints, as a JSON-able dict."""
    import numba
    import numpy

    import minseg

    return {
        "date_utc": utc_now(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores_usable": usable_cores(),
        "cores_visible": os.cpu_count(),
        "cgroup_cpu_limit": cgroup_cpu_limit(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "minseg": minseg.__version__,
        "numba_threading_layer": numba_threading_layer(),
        "threads": {k: v for k, v in threads.items() if not k.startswith("_")},
        "threadpools": threadpools(),
        "torch": torch_info(),
        "env": {k: os.environ[k] for k in REPORTED_ENV if k in os.environ},
    }


def notes(info: dict) -> list[str]:
    """Warnings a reader of the table must see next to it."""
    out = []
    env = info["env"]
    if "OPENBLAS_CORETYPE" in env:
        arch = [p.get("architecture") for p in info["threadpools"] if p.get("internal_api") == "openblas"]
        out.append(
            f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} is set: numpy's OpenBLAS uses that core's kernels "
            f"(architecture {arch}) instead of the ones for this CPU ({', '.join(info['cpu_flags'])}); on an AVX-512 "
            "machine Haswell (AVX2) kernels run numpy's matmul at about half speed. torch brings its own BLAS "
            f"({(info['torch'] or {}).get('blas', 'n/a')}) and oneDNN and is unaffected. "
            "Re-run with --unset-openblas-coretype to measure numpy's BLAS with its own kernels."
        )
    if "OPENBLAS_L2_SIZE" in env:
        out.append(f"OPENBLAS_L2_SIZE={env['OPENBLAS_L2_SIZE']} overrides OpenBLAS's cache blocking.")
    if all(k in env for k in MALLOC_TUNE):
        out.append(
            "MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ are raised (--malloc-tune): freed blocks stay in the heap "
            "and are reused without page faults, for minseg and torch alike."
        )
    t = info["threads"]
    counts = {k: t[k] for k in ("numba", "torch") if k in t}
    blas = [p["num_threads"] for p in info["threadpools"]]
    if len(set(list(counts.values()) + blas)) > 1:
        out.append(f"thread counts differ: {counts}, native pools {blas}")
    load = info["load_average"][0]
    if load > 0.5 * info["cores_usable"]:
        out.append(f"load average {load} on {info['cores_usable']} cores: other work is running, timings are noisy.")
    return out


def header_lines(info: dict) -> list[str]:
    t = info["threads"]
    lines = [
        f"date (UTC)   {info['date_utc']}",
        f"CPU          {info['cpu']}  [{' '.join(info['cpu_flags'])}]",
        f"cores        {info['cores_usable']} usable of {info['cores_visible']} visible"
        + (f", cgroup limit {info['cgroup_cpu_limit']}" if info["cgroup_cpu_limit"] else "")
        + f"; load average {info['load_average']}",
        f"versions     python {info['python']}, numpy {info['numpy']}, numba {info['numba']}, minseg {info['minseg']}",
        f"threads      requested {t['requested']}: numba {t.get('numba')} ({info['numba_threading_layer']}), "
        f"torch {t.get('torch', 'n/a')}" + (f"; {t['threadpoolctl']}" if "threadpoolctl" in t else ""),
    ]
    for p in info["threadpools"]:
        lines.append(
            f"native pool  {p['user_api']} of {p['owner']}: {p['internal_api']} {p['version'] or ''} "
            f"kernel={p.get('architecture') or '-'} layer={p.get('threading_layer') or '-'} "
            f"threads={p['num_threads']} ({os.path.basename(p['filepath'] or '')})"
        )
    tinfo = info["torch"]
    if tinfo:
        lines.append(
            f"torch        {tinfo['version']}: BLAS {tinfo['blas']} {tinfo['mkl'] or ''}, oneDNN {tinfo['onednn']} "
            f"(convs, enabled={tinfo['mkldnn_enabled']}), CPU capability {tinfo['cpu_capability']}, "
            f"{tinfo['num_threads']} threads"
        )
    else:
        lines.append("torch        not installed: no peer column")
    if info["env"]:
        lines.append("env          " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    return lines


# ------------------------------------------------------------- the machine's limits
#
# A kernel's GFLOP/s or GB/s means most next to what the machine can do at all.
# Both limits are measured here, on the machine and thread count of the run, by
# the code that comes closest to them: a large single-precision GEMM in a vendor
# BLAS (FMA-bound, blocked for registers and caches; the best of the BLAS found
# is a lower bound of the FP32 peak, typically within 10% of it), and a parallel
# copy of arrays far larger than the caches (read + write bytes: a lower bound of
# the DRAM bandwidth, as write-allocate traffic is not counted).

PEAK_SIZES = {"full": 2048, "quick": 256}  # SGEMM side n: 2n^3 flops
COPY_BYTES = {"full": 256 << 20, "quick": 8 << 20}  # each of source and destination


def _best_seconds(fn, repeat):
    """The fastest of ``repeat`` timed calls after one untimed call (the limit, not the typical)."""
    import time

    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fp32_peak(size: str = "full", repeat: int = 5) -> dict:
    """Measured FP32 peak: the best GFLOP/s of an n x n x n SGEMM in each BLAS found.

    NumPy's (OpenBLAS: threadpoolctl names the kernel it picked, which
    ``OPENBLAS_CORETYPE`` can force onto an older core's) and torch's (MKL or
    oneDNN) when installed; both run on the threads ``set_threads`` gave them.
    Returns ``{'gflops', 'basis', 'runs': [{'library', 'kernel', 'n', 'gflops'}]}``.
    """
    import numpy as np

    n = PEAK_SIZES[size]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    flops = 2.0 * n**3
    openblas = [p for p in threadpools() if p["user_api"] == "blas" and p["owner"] == "numpy"]
    kernel = openblas[0].get("architecture") if openblas else None
    runs = [dict(library="numpy matmul (" + (openblas[0]["internal_api"] if openblas else "BLAS") + ")", kernel=kernel,
                 n=n, gflops=flops / _best_seconds(lambda: np.matmul(a, b, out=c), repeat) / 1e9)]
    try:
        import torch

        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        runs.append(dict(library=f"torch.mm ({torch_info()['blas']})", kernel=torch.backends.cpu.get_cpu_capability(),
                         n=n, gflops=flops / _best_seconds(lambda: torch.mm(ta, tb, out=tc), repeat) / 1e9))
    except ImportError:
        pass
    best = max(runs, key=lambda r: r["gflops"])
    basis = f"best n={n} SGEMM of {', '.join(r['library'] + (' kernel ' + str(r['kernel']) if r['kernel'] else '') for r in runs)}"
    return dict(gflops=best["gflops"], basis=basis, runs=runs)


def _parallel_copy():
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def copy(src, dst):
        for i in prange(src.size):
            dst[i] = src[i]

    return copy


def copy_bandwidth(size: str = "full", repeat: int = 5) -> dict:
    """Measured memory bandwidth: (read + write bytes) / time of the best parallel copy.

    A Numba ``prange`` copy over all Numba threads, of arrays much larger than
    the last-level cache. Returns ``{'gbytes_per_s', 'basis'}``.
    """
    import numba
    import numpy as np

    nbytes = COPY_BYTES[size]
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    copy = _parallel_copy()
    seconds = _best_seconds(lambda: copy(src, dst), repeat)
    return dict(gbytes_per_s=2 * nbytes / seconds / 1e9,
                basis=f"best parallel copy of {nbytes >> 20} MiB float32 ({numba.get_num_threads()} Numba threads), "
                      "bytes read + written")


def limits(size: str = "full") -> dict:
    """Both limits, for the header and the % columns."""
    return dict(fp32_peak=fp32_peak(size), bandwidth=copy_bandwidth(size))


def limit_lines(lim: dict) -> list[str]:
    peak, bw = lim["fp32_peak"], lim["bandwidth"]
    runs = "; ".join(f"{r['library']}: {r['gflops']:.1f}" for r in peak["runs"])
    return [
        f"FP32 peak    {peak['gflops']:.1f} GFLOP/s measured ({peak['basis']}; {runs}): the '% peak' column",
        f"bandwidth    {bw['gbytes_per_s']:.1f} GB/s measured ({bw['basis']}): the '% bw' column",
    ]
