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


def _backward_problem(dtype, stride, c_in, relu, seed=2, small=False):
    """The input, weights and batch-norm weight of a conv -> batch norm layer; ``small`` for the CUDA
    simulator (4 output channels of 4x6 pixels: every simulated thread is a Python thread), else 16
    output channels 16 pixels wide (whole vectors: the cpu backend's v6 grad_weight applies)."""
    rng = np.random.default_rng(seed)
    c_out, width = (4, 6) if small else (16, 16)
    x = rng.standard_normal((2, c_in, 4 if small else 5, width)).astype(dtype)
    w = rng.standard_normal((c_out, c_in, 3, 3)).astype(dtype)
    args = (stride, ((1, 1), (1, 1)), (1, 1), 1)
    bn_w = rng.uniform(0.5, 1.5, c_out).astype(dtype)
    return x, w, args, bn_w, relu


# The cpu backend's one compiled call needs grad_weight's default (v6: float32, Og and Wo whole vectors
# of 16, Cg >= 8) and, when gx is wanted, grad_input's stride-1 path: Cg = 8 at stride 1 has both; gx
# not wanted (a first layer); Cg = 3 (v6 does not apply), stride (2, 1) and float64 take the separate calls.
# The CUDA simulator runs the Cg = 3 float32 case only, on a smaller problem (its cost; its backward is
# the composition of kernels tests/cuda checks on their own).
BACKWARD_CASES = [(np.float32, (1, 1), 8, True, (True, True, False)), (np.float32, (1, 1), 8, False, (False, True, True)),
                  (np.float32, (1, 1), 3, True, (True, True, True)), (np.float32, (2, 1), 8, False, (True, True, False)),
                  (np.float64, (1, 1), 8, True, (True, True, True))]
BACKWARD_PARAMS = [pytest.param(m.values[0], *case, id=f"{m.id}-{np.dtype(case[0]).name}-stride{case[1][0]}-cg{case[2]}-{case[4]}")
                   for m in MODULES for case in BACKWARD_CASES if not (m.id == "cuda" and (case[0] == np.float64 or case[2] == 8))]


@pytest.mark.parametrize("modname, dtype, stride, c_in, relu, needs", BACKWARD_PARAMS)
def test_fused_backward_is_the_separate_calls_bit_for_bit(modname, dtype, stride, c_in, relu, needs):
    fused, conv, batch_norm = _module(modname)
    x, w, args, bn_w, relu = _backward_problem(dtype, stride, c_in, relu, small=modname.endswith("cuda"))
    y, xhat, invstd = batch_norm.batch_norm_training(conv.conv2d_forward(x, w, None, *args), bn_w, None, None, None, 0.1, 1e-5, relu)
    gy = np.random.default_rng(3).standard_normal(np.asarray(y).shape).astype(dtype)
    relu_output = y if relu else None
    got = fused.conv2d_batch_norm_backward(gy, x, w, xhat, invstd, bn_w, *args, True, relu_output, needs)
    gz, g_bn_w, g_bn_b = batch_norm.batch_norm_backward(gy, xhat, invstd, bn_w, True, relu_output)
    expected = (conv.conv2d_grad_input(gz, w, x.shape, *args) if needs[0] else None,
                conv.conv2d_grad_weight(x, gz, w.shape, *args) if needs[1] else None,
                conv.conv2d_grad_bias(gz) if needs[2] else None, g_bn_w, g_bn_b)
    for name, a, e in zip(("gx", "gw", "gb", "gbn_weight", "gbn_bias"), got, expected):
        assert (a is None) == (e is None), name
        if e is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=name)


def test_cpu_fused_backward_is_one_compiled_call_where_the_conv_defaults_allow(monkeypatch):
    cpu = pytest.importorskip("kernels.conv2d_batch_norm.cpu")
    from kernels.batch_norm import cpu as batch_norm
    from kernels.conv2d import cpu as conv

    calls = []
    fused = cpu._batch_norm_then_conv
    monkeypatch.setattr(cpu, "_batch_norm_then_conv", lambda *args: calls.append(1) or fused(*args))
    for dtype, stride, c_in, relu, needs in BACKWARD_CASES:
        calls.clear()
        x, w, args, bn_w, relu = _backward_problem(dtype, stride, c_in, relu)
        y, xhat, invstd = batch_norm.batch_norm_training(conv.conv2d_forward(x, w, None, *args), bn_w, None, None, None, 0.1, 1e-5, relu)
        cpu.conv2d_batch_norm_backward(np.ones_like(y), x, w, xhat, invstd, bn_w, *args, True, y if relu else None, needs)
        one_call = dtype == np.float32 and stride == (1, 1) and c_in >= 8
        assert len(calls) == int(one_call), (dtype, stride, c_in, needs)
