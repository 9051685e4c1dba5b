"""Every CUDA kernel compiles for real GPUs (sm_80 and sm_90), not just in the simulator.

The simulator runs kernels as Python, so it accepts code that Numba's CUDA
compiler rejects (unsupported NumPy calls, a variable typed float64 in one
branch and int in another, reading a Python object). ``benchmarks.ptx_report``
compiles each kernel listed in a module's ``PTX_SIGNATURES`` to PTX and
assembles it (ptxas or nvJitLink, when one is installed). It runs in a
subprocess because this process imported numba with the simulator on.
"""
import json

import pytest

from benchmarks.ptx_report import cuda_modules
from tests import background

CCS = ("80", "90")


@pytest.fixture(scope="module")
def report():
    run = background.result("ptx")  # started when the suite was collected (tests/background.py)
    assert run.stdout, f"ptx_report printed nothing; stderr:\n{run.stderr[-3000:]}"
    result = json.loads(run.stdout)
    assert not result["worker_errors"], "\n".join(result["worker_errors"])
    if not result["nvvm"]:  # the compiler itself is an optional extra; without it there is nothing to run
        pytest.skip("NVVM is not installed: pip install 'minseg[cuda]' to compile kernels to PTX")
    return result


# CUDA modules that only call other modules' kernels (a fused op's composition on the GPU)
COMPOSITIONS = ("kernels.conv2d_batch_norm.cuda", "kernels.interpolate_cat.cuda")


def test_there_are_cuda_modules():
    assert "kernels.conv2d.cuda" in cuda_modules()


@pytest.mark.parametrize("modname", cuda_modules())
def test_every_kernel_is_listed_and_compiles(report, modname):
    info = report["modules"][modname]
    assert info["error"] is None, f"{modname} did not import or lacks PTX_SIGNATURES: {info['error']}"
    if modname in COMPOSITIONS:  # launches other modules' kernels, none of its own (those are checked there)
        assert not info["kernels"] and not info["unlisted"], f"{modname} defines kernels: list them, and drop it from COMPOSITIONS"
        return
    assert info["kernels"], f"{modname}.PTX_SIGNATURES is empty"
    problems = [f"@cuda.jit kernel missing from PTX_SIGNATURES: {name}" for name in info["unlisted"]]
    rows = [r for r in report["rows"] if r["module"] == modname]
    for kernel in info["kernels"]:
        signatures = {r["signature"] for r in rows if r["kernel"] == kernel}
        for dtype in ("float32", "float64"):
            if not any(dtype in s for s in signatures):
                problems.append(f"{kernel} has no {dtype} signature")
        if {r["cc"] for r in rows if r["kernel"] == kernel} != set(CCS):
            problems.append(f"{kernel} was not compiled for every cc in {CCS}")
    problems += [
        f"{r['kernel']} {r['signature']} sm_{r['cc']}: {r['error'] or r['log']}"
        for r in rows
        if not r["compiled"] or r.get("assembled") is False
    ]
    assert not problems, f"{modname}:\n" + "\n\n".join(problems)


def test_static_metrics_of_every_kernel(report):
    """The same report run also analyses each kernel's PTX (loops, FMAs, div/rem) and its occupancy.

    The parser itself is checked on hand-written PTX in tests/test_ptx_report.py; here every
    compiled kernel has the figures, and the tiled GEMM kernels' inner loops are where their
    FMAs are, reading their operands from shared memory.
    """
    from benchmarks.ptx_report import TABLE_HEAD, _table

    rows = [r for r in report["rows"] if r["compiled"]]
    for r in rows:
        assert r["loops"] >= 0 and r["div_rem_in_loops"] >= 0, r
        assert (r["inner_loop"] is None) == (r["loops"] == 0), r
        if r.get("assembled") and r["cc"] in ("80", "90"):
            assert 0 < r["occupancy"] <= 1 and r["block"] >= 32, r
    gemm = [r for r in rows if r["module"] == "kernels.conv2d.cuda" and "gemm" in r["kernel"]]
    assert gemm
    for r in gemm:
        assert r["inner_loop"]["fma"] > 0 and r["inner_loop"]["shared_loads"] > 0, r
    for markdown in (False, True):
        lines = _table(report, markdown=markdown).splitlines()
        assert len(lines) == 2 + len(report["rows"]) and all(h in lines[0] for h in TABLE_HEAD)
