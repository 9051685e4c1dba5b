"""conv2d_batch_norm: every backend's fused call is conv2d_forward then batch_norm_training of the
same backend, bit for bit (outputs and running statistics), and the reference is the composition
of the two references."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import kernel_modules, load, reference

REF = reference("conv2d_batch_norm")


def _problem(dtype, stride, affine, running, seed=0):
    """A small conv problem (the CUDA simulator runs a thread per output) and batch-norm state."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, 3, 7, 6)) * 2 + 1).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    conv = (w, b, stride, ((1, 1), (0, 1)), (1, 1), 1)
    bn_w, bn_b = (rng.uniform(0.5, 1.5, 4).astype(dtype), rng.standard_normal(4).astype(dtype)) if affine else (None, None)
    stats = (rng.standard_normal(4).astype(dtype), rng.uniform(0.5, 2, 4).astype(dtype)) if running else (None, None)
    return x, conv, bn_w, bn_b, stats


def _module(modname):
    """The conv2d_batch_norm module of a backend, and that backend's conv2d and batch_norm modules."""
    suffix = modname.rsplit(".", 1)[1]
    return load(modname), load(f"kernels.conv2d.{suffix}"), load(f"kernels.batch_norm.{suffix}")


# stride 1: the cpu backend's one compiled call (v5's kernel, then the batch norm's); stride (2, 1): its
# fallback, the two calls. float64 on the host backends; the CUDA simulator runs the float32 cases only
# (every simulated thread is a Python thread; its float64 kernels are the float32 ones, retyped).
CASES = [(np.float32, (1, 1), True, True, True), (np.float32, (2, 1), False, False, False), (np.float64, (1, 1), False, True, False)]


MODULES = [pytest.param("kernels.conv2d_batch_norm.reference", id="numpy"), *kernel_modules("conv2d_batch_norm")]
PARAMS = [pytest.param(m.values[0], *case, id=f"{m.id}-{np.dtype(case[0]).name}-stride{case[1][0]}")
          for m in MODULES for case in CASES if not (m.id == "cuda" and case[0] == np.float64)]


@pytest.mark.parametrize("modname, dtype, stride, affine, running, relu", PARAMS)
def test_fused_call_is_the_two_calls_bit_for_bit(modname, dtype, stride, affine, running, relu):
    fused, conv, batch_norm = _module(modname)
    outputs, states = [], []
    for call in ("fused", "two calls"):
        x, (w, b, *args), bn_w, bn_b, (rm, rv) = _problem(dtype, stride, affine, running)
        if call == "fused":
            y = fused.conv2d_batch_norm_training(x, w, b, *args, bn_w, bn_b, rm, rv, 0.1, 1e-5, relu)
        else:
            z = conv.conv2d_forward(x, w, b, *args)
            y = batch_norm.batch_norm_training(z, bn_w, bn_b, rm, rv, 0.1, 1e-5, relu)
        outputs.append([np.asarray(a) for a in y])
        states.append([np.asarray(a) for a in (rm, rv) if a is not None])
    for name, a, e in zip(("y", "xhat", "invstd"), *outputs):
        np.testing.assert_array_equal(a, e, err_msg=name)
    for a, e in zip(*states):
        np.testing.assert_array_equal(a, e, err_msg="running statistics")
    assert len(states[0]) == (2 if running else 0)


def test_reference_is_the_composition_of_the_references():
    x, (w, b, *args), bn_w, bn_b, (rm, rv) = _problem(np.float64, (1, 1), True, True, seed=1)
    rm2, rv2 = rm.copy(), rv.copy()
    y, xhat, invstd = REF.conv2d_batch_norm_training(x, w, b, *args, bn_w, bn_b, rm, rv, 0.1, 1e-5, True)
    z = reference("conv2d").conv2d_forward(x, w, b, *args)
    expected = reference("batch_norm").batch_norm_training(z, bn_w, bn_b, rm2, rv2, 0.1, 1e-5, True)
    for name, a, e in zip(("y", "xhat", "invstd"), (y, xhat, invstd), expected):
        np.testing.assert_array_equal(a, e, err_msg=name)
    np.testing.assert_array_equal(rm, rm2)
    np.testing.assert_array_equal(rv, rv2)
    assert (y >= 0).all() and (y > 0).any()  # the ReLU ran, and not everything is cut


def test_cpu_fused_call_runs_both_kernels_in_one_compiled_call(monkeypatch):
    """At stride 1 the cpu backend makes one compiled call (the point of the op), at other strides the two calls."""
    cpu = pytest.importorskip("kernels.conv2d_batch_norm.cpu")
    calls = []
    fused = cpu._conv_then_batch_norm
    monkeypatch.setattr(cpu, "_conv_then_batch_norm", lambda *args: calls.append(1) or fused(*args))
    for stride, expected in (((1, 1), 1), ((2, 1), 0)):
        calls.clear()
        x, (w, b, *args), bn_w, bn_b, (rm, rv) = _problem(np.float32, stride, True, True)
        cpu.conv2d_batch_norm_training(x, w, b, *args, bn_w, bn_b, rm, rv, 0.1, 1e-5, False)
        assert len(calls) == expected, stride
