"""numba-cuda 0.30.4 on NumPy >= 2.5: ``import kernels`` puts back ``np.row_stack`` so CUDA code compiles.

The first run on a real GPU (an H100 with NumPy 2.5.2) failed every CUDA compile with
``AttributeError: module 'numpy' has no attribute 'row_stack'`` (kernels/__init__.py says why).
These tests remove the alias from NumPy in a fresh process, as NumPy 2.5 does, and compile
for a GPU with the simulator off (PTX only: no GPU needed).
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMPILE = """
from numba import cuda
from numba.cuda.cudadrv import nvvm

if not nvvm.is_available():  # the compiler is an optional extra: nothing to compile with
    raise SystemExit("NO_NVVM")

def double(x):
    i = cuda.grid(1)
    if i < x.size:
        x[i] *= 2.0

ptx, _ = cuda.compile_ptx(double, "void(float32[::1])", cc=(8, 0))
print("compiled", ".entry" in ptx)
"""


def _run(prelude: str):
    code = "import numpy as np\nnp.__dict__.pop('row_stack', None)\n" + textwrap.dedent(prelude) + COMPILE
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if "NO_NVVM" in run.stderr:
        pytest.skip("NVVM is not installed: pip install 'minseg[cuda]' to compile kernels to PTX")
    return run


def test_importing_kernels_lets_numba_cuda_compile_without_row_stack():
    run = _run("import kernels\nassert np.row_stack is np.vstack\n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("compiled True"), run.stdout


def test_without_the_alias_numba_cuda_cannot_compile():
    """The failure the fix is for (if numba-cuda stops needing the alias, this test says so)."""
    run = _run("")
    assert run.returncode != 0 and "row_stack" in run.stderr, (run.returncode, run.stderr[-3000:])
