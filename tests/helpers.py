"""Helpers shared by the tests: which kernel modules exist, whole-tensor comparison, torch."""
from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

from minseg.backend import MODULE_OF, to_numpy

KERNEL_BACKENDS = [name for name in MODULE_OF if name != "numpy"]


def reference(op: str):
    """The NumPy reference module of ``op``."""
    return importlib.import_module(f"kernels.{op}.reference")


def kernel_modules(op: str) -> list:
    """pytest params: every non-reference backend module of ``op`` that exists.

    A kernel file is tested as soon as it is added; a backend whose module is
    absent simply has nothing to test yet.
    """
    params = []
    for name in KERNEL_BACKENDS:
        modname = f"kernels.{op}.{MODULE_OF[name]}"
        if importlib.util.find_spec(modname) is not None:
            params.append(pytest.param(modname, id=name))
    return params


def load(modname: str):
    return importlib.import_module(modname)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, name="output"):
    """Whole-array comparison with shape and dtype checks and a readable failure."""
    actual = to_numpy(actual)
    expected = to_numpy(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def tol(dtype):
    """(rtol, atol) for comparing two float computations of the same formula.

    float32: sums of up to ~10^3 terms reassociated differently drift by a few ulp
    times sqrt(terms); 1e-4 / 1e-5 leaves headroom. float64: 1e-10.
    """
    return (1e-4, 1e-5) if np.dtype(dtype) == np.float32 else (1e-10, 1e-12)


def torch_or_skip():
    return pytest.importorskip(
        "torch", reason="oracle tests need torch (pip install torch==2.13.0); minseg itself never needs it"
    )


def oracle_backends() -> list:
    """pytest params: every backend that loads here (the cuda one under the simulator without a GPU).

    The torch oracle tests run on each, so a bug in one backend's kernel meets torch, not only
    the reference; keep their shapes small (the simulator runs one Python thread per CUDA thread).
    """
    from minseg.backend import available_backends

    return [pytest.param(name, id=name) for name in available_backends()]


def cat_pieces(base, dim, sizes, dtype, seed):
    """Arrays for cat: shaped ``base`` except ``sizes[i]`` along ``dim``, with random values
    (``seed``: an int, or a Generator, which draws on)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        shape = list(base)
        shape[dim] = n
        out.append(rng.standard_normal(shape).astype(dtype))
    return out
