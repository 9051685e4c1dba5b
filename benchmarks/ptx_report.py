"""Registers, spills and shared memory of every CUDA kernel -- no GPU needed.

    python -m benchmarks.ptx_report                 # table for sm_90
    python -m benchmarks.ptx_report --cc 80 90      # several targets
    python -m benchmarks.ptx_report --json          # machine-readable (tests/cuda/test_ptx.py)
    python -m benchmarks.ptx_report --markdown      # the table of benchmarks/RESULTS.md

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

From the PTX itself (``analyse_ptx``), without assembling:

* **loops** -- the control-flow graph of the kernel's basic blocks, its back
  edges (a branch to a block on the current depth-first path) and their natural
  loops. The **inner loop** is the loop with the most FMAs: in a
  GEMM-like kernel (the conv forward and gradients) the loop over the reduction
  slice, where the time goes. Counted are the loop's own blocks (the bodies of
  loops nested in it, e.g. a tile-staging loop, excluded). Its columns: FMA instructions (``fma.rn.f32/f64``)
  against all other instructions (index arithmetic, loads, branches: an FP32
  pipe can at most reach FMA / (FMA + other) of its peak if it issues one
  instruction per cycle), shared loads and how many of them are vectorised
  (``ld.shared.v2``/``.v4``: one instruction moves 8 or 16 bytes).
* **div/rem in loops** -- ``div``/``rem`` instructions inside any loop. An
  integer division by a run-time value is a ~20-instruction subroutine on the
  GPU; in a loop it costs every iteration.
* **theoretical occupancy** (``occupancy``) from registers and shared memory
  with the per-SM limits of the target (``SM_LIMITS``; H100 = sm_90: 65536
  registers allocated per warp in units of 256, 228 KiB shared memory in units
  of 128 bytes plus 1 KiB reserved per block, 2048 threads, 32 blocks): resident
  warps / 64. It is computed at the kernel's launch bound (``.maxntid``) when it
  declares one, else at ``DEFAULT_BLOCK`` threads per block.

The assembler is ``ptxas`` (on PATH or in /usr/local/cuda*/bin). When it is
older than Numba's NVVM it refuses the newer PTX ISA version; the report then
uses nvJitLink, which ships with the same CUDA release as NVVM and runs the
same ptxas inside. The ``tool`` column says which one ran.

The kernel signatures are shared between two subprocesses (in parallel: every other
one each), each compiling its kernels for every target: a kernel's front end (typing, lowering to NVVM IR) runs
once, and NVVM turns that IR into the PTX of each compute capability
(``compile_all``). Numba compiles ``@cuda.jit(device=True)`` helpers for the
*current* GPU's compute capability, so a worker tells it which one to assume
(the first target). One subprocess per target, each compiling everything, took
185 s of CPU (95 s wall) for sm_80 and sm_90 on the 2-core machine.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import math
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


# ------------------------------------------------------------------ static PTX analysis

DEFAULT_BLOCK = 256  # threads per block assumed for occupancy when a kernel declares no launch bound
# Per-SM limits (CUDA C Programming Guide, compute capabilities table; occupancy calculator).
SM_LIMITS = {
    "80": dict(registers=65536, register_unit=256, shared=167936, shared_unit=128, reserved_shared=1024, threads=2048,
               blocks=32, warps=64),
    "90": dict(registers=65536, register_unit=256, shared=233472, shared_unit=128, reserved_shared=1024, threads=2048,
               blocks=32, warps=64),
}
_INSTRUCTION = re.compile(r"^(@!?%\w+\s+)?([a-z][\w.]*)")
_BRANCH_TARGET = re.compile(r"\bbra(?:\.uni)?\s+([$\w]+)\s*;")


def _entry_lines(ptx: str) -> list[str]:
    """The body of the (first) kernel entry: the lines between its '{' and the closing '}' at column 0."""
    lines = ptx.splitlines()
    start = next(i for i, line in enumerate(lines) if ".entry" in line)
    open_brace = next(i for i in range(start, len(lines)) if lines[i].strip() == "{")
    end = next(i for i in range(open_brace + 1, len(lines)) if lines[i].startswith("}"))
    return lines[open_brace + 1 : end]


def basic_blocks(ptx: str) -> list[dict]:
    """The kernel's basic blocks in text order: {'label', 'ops' (opcodes), 'succ' (indices)}."""
    blocks = [dict(label=None, ops=[], branch=None, conditional=False, ends=False)]
    for raw in _entry_lines(ptx):
        line = raw.split("//")[0].strip()
        if not line or line in ("{", "}") or line.startswith("."):
            continue
        if line.endswith(":"):  # a label starts a block
            if blocks[-1]["ops"] or blocks[-1]["label"]:
                blocks.append(dict(label=None, ops=[], branch=None, conditional=False, ends=False))
            blocks[-1]["label"] = line[:-1]
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        predicated, op = bool(match.group(1)), match.group(2)
        block = blocks[-1]
        block["ops"].append(op)
        if op.startswith("bra") or op in ("ret", "exit"):
            target = _BRANCH_TARGET.search(line)
            block.update(branch=target.group(1) if target else None, conditional=predicated, ends=not predicated)
            blocks.append(dict(label=None, ops=[], branch=None, conditional=False, ends=False))
    blocks = [b for b in blocks if b["ops"] or b["label"]]
    index = {b["label"]: i for i, b in enumerate(blocks) if b["label"]}
    for i, b in enumerate(blocks):
        succ = []
        if b["branch"] is not None:
            succ.append(index[b["branch"]])
        if not b["ends"] and i + 1 < len(blocks):  # falls through (no branch, or a predicated one)
            succ.append(i + 1)
        b["succ"] = succ
    return blocks


def natural_loops(blocks: list[dict]) -> list[set[int]]:
    """The natural loop (a set of block indices) of every loop header, found from the back edges of a DFS."""
    back_edges, state = [], {}
    stack = [(0, iter(blocks[0]["succ"]))] if blocks else []
    state[0] = "open"
    while stack:  # iterative DFS: a back edge goes to a block still open on the path
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            state[node] = "done"
            stack.pop()
        elif state.get(child) == "open":
            back_edges.append((node, child))
        elif child not in state:
            state[child] = "open"
            stack.append((child, iter(blocks[child]["succ"])))
    preds = {i: [] for i in range(len(blocks))}
    for i, b in enumerate(blocks):
        for j in b["succ"]:
            preds[j].append(i)
    loops = {}
    for tail, head in back_edges:
        body, work = {head, tail}, [tail] if tail != head else []
        while work:  # everything that reaches the tail without passing the header
            for p in preds[work.pop()]:
                if p not in body:
                    body.add(p)
                    work.append(p)
        loops.setdefault(head, set()).update(body)
    return list(loops.values())


def _count(blocks, body) -> dict:
    ops = [op for i in body for op in blocks[i]["ops"]]
    fma = sum(op.startswith("fma.") and op.split(".")[-1] in ("f32", "f64") for op in ops)
    shared = [op for op in ops if op.startswith("ld.shared")]
    return dict(fma=fma, other=len(ops) - fma, shared_loads=len(shared),
                vector_shared_loads=sum(".v2" in op or ".v4" in op for op in shared),
                div_rem=sum(op.split(".")[0] in ("div", "rem") for op in ops))


def analyse_ptx(ptx: str) -> dict:
    """Loop metrics of a kernel's PTX (see the module docstring): loops, inner-loop counts, div/rem in loops."""
    blocks = basic_blocks(ptx)
    loops = natural_loops(blocks)
    in_loops = set().union(*loops) if loops else set()
    # A loop's own blocks: its body less the bodies of the loops nested in it (they run their own trip counts).
    own = [body - set().union(*(other for other in loops if other < body)) for body in loops]
    inner = max(own, key=lambda blocks_: (_count(blocks, blocks_)["fma"], -len(blocks_)), default=None)
    maxntid = re.search(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", ptx)
    block = math.prod(int(g) for g in maxntid.groups() if g) if maxntid else None
    return dict(
        loops=len(loops),
        div_rem_in_loops=_count(blocks, in_loops)["div_rem"],
        inner_loop=_count(blocks, inner) if inner is not None else None,
        maxntid=block,
    )


def occupancy(registers: int, shared: int, block: int, cc: str, shared_includes_reserved: bool) -> dict:
    """Theoretical occupancy (resident warps / max warps) of a kernel on one SM of sm_<cc>, and what limits it."""
    lim = SM_LIMITS[cc]
    warps = -(-block // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // lim["register_unit"]) * lim["register_unit"]
    # The runtime reserves 1 KiB per block on sm_80+; nvJitLink's smem figure already holds it when non-zero.
    smem = shared + (0 if shared_includes_reserved and shared else lim["reserved_shared"])
    smem = -(-smem // lim["shared_unit"]) * lim["shared_unit"]
    limits = dict(
        registers=(lim["registers"] // regs_per_warp) // warps,
        shared=lim["shared"] // smem,
        threads=lim["threads"] // (warps * 32),
        blocks=lim["blocks"],
    )
    blocks = min(limits.values())
    return dict(occupancy=blocks * warps / lim["warps"], block=block, blocks_per_sm=blocks,
                limited_by=min(limits, key=limits.get))


def _front_end(kernel, sig, capability):
    """Numba's compilation of ``kernel`` at ``sig`` up to its code library (typing and lowering to NVVM IR: most
    of the time), from which ``library.get_asm_strs(cc=...)`` makes the PTX of any compute capability.
    numba-cuda's ``compile_ptx`` does the same and keeps only one cc's PTX; it has no public call that
    returns the library, hence the private one (None where this numba-cuda lacks it)."""
    from numba.cuda import compiler

    fixup = getattr(compiler, "_compile_pyfunc_with_fixup", None)
    if fixup is None:
        return None
    return fixup(kernel.py_func, sig, device=False, cc=capability, abi="numba")[0]


def _ptx(kernel, sig, cc, library):
    """The PTX of ``kernel`` at ``sig`` for sm_<cc>: from ``library`` (the front end compiled once for every cc),
    or, without one, a whole compilation for this cc."""
    from numba import cuda

    capability = (int(cc[:-1]), int(cc[-1]))
    if library is None:
        _assume_device(cc)
        return cuda.compile_ptx(kernel.py_func, sig, cc=capability)[0]
    ptxes = library.get_asm_strs(cc=capability)
    if len(ptxes) != 1:
        raise RuntimeError(f"compiling gives {len(ptxes)} PTX files, not one")
    return ptxes[0]


def compile_all(ccs, assemble_ptx: bool = True, part=(0, 1)) -> dict:
    """Compile every listed kernel signature of every CUDA module for each sm_<cc> of ``ccs`` in this process
    (simulator off); ``part`` (k, n): only every n-th signature from the k-th, so that n processes share the
    work. Returns modules and rows (one per kernel, signature and cc).

    Each kernel's front end runs once (``_front_end``, for the first cc) and its PTX for every cc comes
    from that one library: NVVM IR does not depend on the target (checked on relu's kernel: the PTX of a
    compilation for sm_90 and the one made from an sm_80 library differ only in Numba's mangled
    names), and the front end is most of the work (2.3 s of 3.3 s for 18 kernels; a scratch timing)."""
    from numba import config
    from numba.cuda.cudadrv import nvvm

    if config.ENABLE_CUDASIM:
        raise RuntimeError("the PTX compile needs NUMBA_ENABLE_CUDASIM=0 before numba is imported")
    if not nvvm.is_available():
        return {"nvvm": False, "modules": {}, "rows": []}
    ccs = list(ccs)
    _assume_device(ccs[0])
    first = (int(ccs[0][:-1]), int(ccs[0][-1]))
    infos, rows, count = {}, [], 0
    for modname in cuda_modules():
        info = infos[modname] = {"error": None, "unlisted": [], "kernels": []}
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
                count += 1
                if (count - 1) % part[1] != part[0]:
                    continue
                try:
                    library, front_error = _front_end(kernel, sig, first), None
                except Exception as e:
                    library, front_error = None, f"{type(e).__name__}: {e}"[-2000:]
                for cc in ccs:
                    row = {"module": modname, "kernel": kernel.py_func.__name__, "signature": sig, "cc": cc, "index": count}
                    try:
                        if front_error:
                            raise RuntimeError(front_error)
                        ptx = _ptx(kernel, sig, cc, library)
                        row.update(compiled=True, error=None, **analyse_ptx(ptx))
                        if assemble_ptx:
                            row.update(assemble(ptx, cc))
                            if row.get("assembled") and cc in SM_LIMITS:
                                row.update(occupancy(row["registers"], row["smem"] or 0, row["maxntid"] or DEFAULT_BLOCK, cc,
                                                     shared_includes_reserved=row["tool"] == "nvjitlink"))
                    except Exception as e:
                        row.update(compiled=False, error=f"{type(e).__name__}: {e}"[-2000:])
                    rows.append(row)
    return {"nvvm": True, "modules": infos, "rows": rows}


def collect(ccs=DEFAULT_CCS, assemble_ptx: bool = True, workers: int = 2) -> dict:
    """Run ``workers`` subprocesses in parallel, each compiling every ``workers``-th kernel signature for every cc
    (one front end per kernel: ``compile_all``); merge their results, rows in the order of ccs, then modules."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    flags = [] if assemble_ptx else ["--no-assemble"]
    modules = cuda_modules()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ptx_report", "--worker", ",".join(ccs), "--worker-part", f"{k}/{workers}", *flags],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(workers)
    ]
    merged = {"nvvm": True, "modules": {}, "rows": [], "worker_errors": []}
    for k, proc in enumerate(procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            merged["worker_errors"].append(f"worker {k}/{workers} exited {proc.returncode}: {err[-3000:]}")
            continue
        result = json.loads(out)
        merged["nvvm"] &= result["nvvm"]
        merged["modules"].update(result["modules"])
        merged["rows"] += result["rows"]
    order = {m: k for k, m in enumerate(modules)}
    merged["rows"].sort(key=lambda r: (list(ccs).index(r["cc"]), order[r["module"]], r["index"]))
    return merged


TABLE_HEAD = ("kernel", "dtype", "sm", "regs", "spill st/ld B", "smem B", "occupancy (block, limit)", "loops",
              "div/rem in loops", "inner loop FMA / other", "FMA share", "inner ld.shared (vector)", "tool")


def _row(r: dict) -> tuple:
    name = f"{r['module'].split('.')[1]}.{r['kernel']}"
    head = (name, _dtype_of(r["signature"]), r["cc"])
    if not r["compiled"]:
        return head + ("COMPILE ERROR",) + ("",) * (len(TABLE_HEAD) - 4)
    if r.get("assembled") is None:  # no assembler installed: PTX figures only
        resources = ("-", "-", "-", "-")
    elif not r["assembled"]:
        resources = ("ASM ERROR", "", "", "")
    else:
        occ = f"{r['occupancy']:.0%} ({r['block']}, {r['limited_by']})" if "occupancy" in r else "-"
        resources = (str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["smem"] or 0), occ)
    inner = r.get("inner_loop")
    if inner:
        total = inner["fma"] + inner["other"]
        loop = (f"{inner['fma']} / {inner['other']}", f"{inner['fma'] / total:.0%}",
                f"{inner['shared_loads']} ({inner['vector_shared_loads']})")
    else:
        loop = ("-", "-", "-")
    return head + resources + (str(r["loops"]), str(r["div_rem_in_loops"])) + loop + (r.get("tool") or "-",)


def _table(result: dict, markdown: bool = False) -> str:
    lines = [_row(r) for r in result["rows"]]
    if markdown:
        return "\n".join(["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
                         + ["| " + " | ".join(row) + " |" for row in lines])
    widths = [max(len(str(row[i])) for row in [TABLE_HEAD] + lines) for i in range(len(TABLE_HEAD))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    rule = fmt.format(*("-" * w for w in widths))
    return "\n".join([fmt.format(*TABLE_HEAD), rule, *(fmt.format(*row) for row in lines)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", nargs="+", default=list(DEFAULT_CCS), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-assemble", action="store_true", help="compile to PTX only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: compile for these ccs (comma-separated), print JSON
    parser.add_argument("--worker-part", default="0/1", help=argparse.SUPPRESS)  # internal: k/n, the worker's share
    args = parser.parse_args(argv)
    if args.worker:
        k, n = (int(v) for v in args.worker_part.split("/"))
        print(json.dumps(compile_all(args.worker.split(","), not args.no_assemble, (k, n))))
        return 0
    result = collect(args.cc, not args.no_assemble)
    if args.json:
        print(json.dumps(result, indent=1))
    elif not result["nvvm"]:
        print("NVVM is not installed: pip install 'minseg[cuda]' (numba-cuda[cu13]) to compile kernels to PTX")
    else:
        print(_table(result, markdown=args.markdown))
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
