"""Registers, spills and shared memory of every CUDA kernel -- no GPU needed.

    python -m benchmarks.ptx_report                 # table for sm_90
    python -m benchmarks.ptx_report --cc 80 90      # several targets
    python -m benchmarks.ptx_report --json          # machine-readable (tests/cuda/test_ptx.py)

Every ``kernels/<op>/cuda.py`` lists its kernels and the signatures they must
compile for in ``PTX_SIGNATURES``. This script compiles each one to PTX with
Numba (NVVM, the simulator off) and assembles the PTX to machine code for
``sm_<cc>``, printing what the assembler reports:

* **registers per thread** -- an SM has 65536, so a kernel using R registers runs
  at most 65536 / R threads per SM (e.g. 64 registers: 1024 threads, half of
  Hopper's 2048). Fewer resident threads hide less memory latency.
* **spill stores / loads** -- bytes a thread moves to local memory (cached
  DRAM) because its values do not fit the registers; non-zero in a hot loop is
  a red flag.
* **shared memory** per block (static ``cuda.shared.array``; nvJitLink also
  counts the 1 KiB per block that sm_80+ reserves for the system).

The assembler is ``ptxas`` (on PATH or in /usr/local/cuda*/bin). When it is
older than Numba's NVVM it refuses the newer PTX ISA version; the report then
uses nvJitLink, which ships with the same CUDA release as NVVM and runs the
same ptxas inside. The ``tool`` column says which one ran.

Each target compute capability compiles in its own subprocess (in parallel):
Numba compiles ``@cuda.jit(device=True)`` helpers for the *current* GPU's
compute capability and caches them, so the worker tells it which one to assume.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CCS = ("90",)


def cuda_modules() -> list[str]:
    """Dotted names of every kernels/<op>/cuda.py, sorted."""
    return sorted(f"kernels.{p.parent.name}.cuda" for p in (ROOT / "kernels").glob("*/cuda.py"))


def jit_kernels(module) -> dict:
    """The @cuda.jit kernels (not device functions) that ``module`` itself defines, by name."""
    from numba.cuda.dispatcher import CUDADispatcher

    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, CUDADispatcher)
        and not obj.targetoptions.get("device")
        and obj.py_func.__module__ == module.__name__
    }


def ptxas_path() -> str | None:
    """ptxas on PATH, else the newest /usr/local/cuda*/bin/ptxas, else None."""
    candidates = [shutil.which("ptxas"), *sorted(glob.glob("/usr/local/cuda*/bin/ptxas"), reverse=True)]
    return next((c for c in candidates if c), None)


def _nvjitlink_log(ptx: str, cc: str) -> tuple[bool, str]:
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch=sm_{cc}", "-verbose"])
    try:
        data = ptx.encode()
        try:  # adding PTX assembles it; complete() links
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
            nvjitlink.complete(handle)
            ok = True
        except nvjitlink.nvJitLinkError:
            ok = False
        size = nvjitlink.get_error_log_size(handle) if not ok else nvjitlink.get_info_log_size(handle)
        log = bytearray(size)
        (nvjitlink.get_info_log if ok else nvjitlink.get_error_log)(handle, log)
        return ok, log.decode(errors="replace").rstrip("\x00")
    finally:
        nvjitlink.destroy(handle)


def assemble(ptx: str, cc: str) -> dict:
    """Assemble ``ptx`` for sm_<cc>; registers, spills and shared memory as the assembler reports them.

    ``assembled`` is True or False, or None when no assembler is installed.
    """
    tool, ok, log = None, None, ""
    ptxas = ptxas_path()
    if ptxas:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "kernel.ptx")
            Path(src).write_text(ptx)
            run = subprocess.run(
                [ptxas, "-v", "--gpu-name", f"sm_{cc}", src, "-o", os.devnull], capture_output=True, text=True
            )
        tool, ok, log = "ptxas", run.returncode == 0, run.stdout + run.stderr
        if not ok and "Unsupported .version" in log:
            tool, ok = None, None  # ptxas is older than NVVM's PTX ISA: try nvJitLink
    if tool is None:
        try:
            ok, log = _nvjitlink_log(ptx, cc)
            tool = "nvjitlink"
        except ImportError:
            pass
    stats = {"tool": tool, "assembled": ok, "log": "" if ok else log[-2000:]}
    for key, pattern in (
        ("registers", r"[Uu]sed (\d+) registers"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
        ("smem", r"(\d+) bytes smem"),
    ):
        match = re.search(pattern, log)
        stats[key] = int(match.group(1)) if match else None
    return stats


def _assume_device(cc: str) -> None:
    """Make Numba compile device functions for ``cc`` instead of asking the (absent) GPU."""
    from numba.cuda import dispatcher

    capability = (int(cc[:-1]), int(cc[-1]))
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=capability)


def _dtype_of(signature: str) -> str:
    return next((t for t in ("float32", "float64") if t in signature), "-")


def compile_all(cc: str, assemble_ptx: bool = True) -> dict:
    """Compile every listed kernel for sm_<cc> in this process (simulator off). Returns modules and rows."""
    from numba import config, cuda
    from numba.cuda.cudadrv import nvvm

    if config.ENABLE_CUDASIM:
        raise RuntimeError("the PTX compile needs NUMBA_ENABLE_CUDASIM=0 before numba is imported")
    if not nvvm.is_available():
        return {"nvvm": False, "modules": {}, "rows": []}
    _assume_device(cc)
    capability = (int(cc[:-1]), int(cc[-1]))
    modules, rows = {}, []
    for modname in cuda_modules():
        info = modules[modname] = {"error": None, "unlisted": [], "kernels": []}
        try:
            module = importlib.import_module(modname)
            listed = module.PTX_SIGNATURES
        except Exception as e:  # an import error or a missing PTX_SIGNATURES is the finding
            info["error"] = f"{type(e).__name__}: {e}"
            continue
        info["kernels"] = [k.py_func.__name__ for k, _ in listed]
        listed_ids = {id(kernel) for kernel, _ in listed}
        info["unlisted"] = sorted(name for name, k in jit_kernels(module).items() if id(k) not in listed_ids)
        for kernel, signatures in listed:
            for sig in signatures:
                row = {"module": modname, "kernel": kernel.py_func.__name__, "signature": sig, "cc": cc}
                try:
                    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=capability)
                    row.update(compiled=True, error=None)
                    if assemble_ptx:
                        row.update(assemble(ptx, cc))
                except Exception as e:
                    row.update(compiled=False, error=f"{type(e).__name__}: {e}"[-2000:])
                rows.append(row)
    return {"nvvm": True, "modules": modules, "rows": rows}


def collect(ccs=DEFAULT_CCS, assemble_ptx: bool = True) -> dict:
    """Run one worker subprocess per compute capability in parallel; merge their results."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    flags = [] if assemble_ptx else ["--no-assemble"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ptx_report", "--worker", cc, *flags],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cc in ccs
    ]
    merged = {"nvvm": True, "modules": {}, "rows": [], "worker_errors": []}
    for cc, proc in zip(ccs, procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            merged["worker_errors"].append(f"sm_{cc} worker exited {proc.returncode}: {err[-3000:]}")
            continue
        result = json.loads(out)
        merged["nvvm"] &= result["nvvm"]
        merged["modules"].update(result["modules"])
        merged["rows"] += result["rows"]
    return merged


def _table(result: dict) -> str:
    header = ("kernel", "dtype", "sm", "regs", "spill st/ld B", "smem B", "tool")
    lines = []
    for r in result["rows"]:
        name = f"{r['module'].split('.')[1]}.{r['kernel']}"
        if not r["compiled"]:
            lines.append((name, _dtype_of(r["signature"]), r["cc"], "COMPILE ERROR", "", "", ""))
            continue
        if r.get("assembled") is None:  # no assembler installed: PTX only
            lines.append((name, _dtype_of(r["signature"]), r["cc"], "-", "-", "-", "-"))
            continue
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        regs = str(r["registers"]) if r["assembled"] else "ASM ERROR"
        lines.append((name, _dtype_of(r["signature"]), r["cc"], regs, spills, str(r["smem"] or 0), r["tool"]))
    widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    rule = fmt.format(*("-" * w for w in widths))
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*row) for row in lines)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", nargs="+", default=list(DEFAULT_CCS), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-assemble", action="store_true", help="compile to PTX only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: compile for one cc, print JSON
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(compile_all(args.worker, not args.no_assemble)))
        return 0
    result = collect(args.cc, not args.no_assemble)
    if args.json:
        print(json.dumps(result, indent=1))
    elif not result["nvvm"]:
        print("NVVM is not installed: pip install 'minseg[cuda]' (numba-cuda[cu13]) to compile kernels to PTX")
    else:
        print(_table(result))
        for modname, info in result["modules"].items():
            if info["error"] or info["unlisted"]:
                problem = info["error"] or "kernels missing from PTX_SIGNATURES: " + ", ".join(info["unlisted"])
                print(f"{modname}: {problem}")
        for r in result["rows"]:
            if r.get("error") or r.get("log"):
                where = f"{r['module']}.{r['kernel']} {r['signature']} sm_{r['cc']}"
                print(f"\n{where}:\n{r.get('error') or r['log']}")
        print("\n".join(result["worker_errors"]))
    failed = (
        not result["nvvm"]
        or result["worker_errors"]
        or any(not r["compiled"] or r.get("assembled") is False for r in result["rows"])
        or any(i["error"] or i["unlisted"] for i in result["modules"].values())
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
