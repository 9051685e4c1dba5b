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


def _layers_problem(dtype, stride, c_in, relu, count, small=False, seed=5):
    """``count`` conv -> batch norm layers (the first from c_in channels, then c_out -> c_out), the first at
    ``stride``, with their batch-norm state: each a tuple of conv2d_batch_norm_training's arguments after x."""
    rng = np.random.default_rng(seed)
    c_out, width = (2, 4) if small else (16, 16)  # small: the CUDA simulator runs a Python thread per output
    x = (rng.standard_normal((1 if small else 2, c_in, 3 if small else 5, width)) * 2 + 1).astype(dtype)
    layers = []
    for k in range(count):
        w = rng.standard_normal((c_out, c_in if k == 0 else c_out, 3, 3)).astype(dtype)
        conv = (w, None, stride if k == 0 else (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
        bn = (rng.uniform(0.5, 1.5, c_out).astype(dtype), rng.standard_normal(c_out).astype(dtype),
              rng.standard_normal(c_out).astype(dtype), rng.uniform(0.5, 2, c_out).astype(dtype), 0.1, 1e-5, relu)
        layers.append((*conv, *bn))
    return x, layers


# (dtype, first layer's stride, C_in, relu, layers, needs of the first layer): Cg = 8, stride 1, float32
# and 2 or 3 layers is the cpu backend's fused path (one compiled call per two layers, then one for the
# third); C_in = 3 (v6's grad_weight does not apply to the first layer) and stride 2 (no one-call forward)
# take its layer-by-layer fallback, as float64 does. The CUDA simulator runs the small C_in = 3 case.
LAYERS_CASES = [(np.float32, (1, 1), 8, True, 2, (True, True, False)), (np.float32, (1, 1), 8, False, 3, (False, True, False)),
                (np.float32, (1, 1), 3, True, 2, (False, True, False)), (np.float32, (2, 1), 8, True, 2, (True, True, False)),
                (np.float64, (1, 1), 8, True, 2, (True, True, True))]
LAYERS_PARAMS = [pytest.param(m.values[0], *case, id=f"{m.id}-{np.dtype(case[0]).name}-stride{case[1][0]}-cg{case[2]}-x{case[4]}")
                 for m in MODULES for case in LAYERS_CASES if not (m.id == "cuda" and (case[0] == np.float64 or case[2] == 8))]


@pytest.mark.parametrize("modname, dtype, stride, c_in, relu, count, needs", LAYERS_PARAMS)
def test_layers_are_the_one_layer_calls_one_after_another_bit_for_bit(modname, dtype, stride, c_in, relu, count, needs):
    """Forward: every layer's (y, xhat, invstd) and running statistics; backward: every layer's five
    gradients, each layer's gx the gy of the one before: the one-layer calls of the same backend."""
    fused = load(modname)
    small = modname.endswith("cuda")
    results = []
    for call in ("layers", "one by one"):
        x, layers = _layers_problem(dtype, stride, c_in, relu, count, small)
        if call == "layers":
            outputs = fused.conv2d_batch_norm_layers_training(x, layers)
        else:
            outputs, h = [], x
            for layer in layers:
                outputs.append(fused.conv2d_batch_norm_training(h, *layer))
                h = outputs[-1][0]
        assert len(outputs) == count
        saved, h = [], x
        for (w, _, stride_k, padding, dilation, groups, bn_w, *_), (y, xhat, invstd) in zip(layers, outputs):
            saved.append((h, w, xhat, invstd, bn_w, stride_k, padding, dilation, groups, True, y if relu else None))
            h = y
        all_needs = [needs] + [(True, True, False)] * (count - 1)  # every later layer hands a gradient on
        gy = np.random.default_rng(7).standard_normal(np.asarray(h).shape).astype(dtype)
        if call == "layers":
            grads = fused.conv2d_batch_norm_layers_backward(gy, saved, all_needs)
        else:
            grads = [None] * count
            for k in range(count - 1, -1, -1):
                grads[k] = fused.conv2d_batch_norm_backward(gy, *saved[k], all_needs[k])
                gy = grads[k][0]
        flat = [np.asarray(a) for out in outputs for a in out] + [np.asarray(a) for layer in layers for a in layer[8:10]]
        results.append((flat, grads))
    (flat, grads), (flat_expected, grads_expected) = results
    for k, (a, e) in enumerate(zip(flat, flat_expected)):
        np.testing.assert_array_equal(a, e, err_msg=f"forward output {k}")
    for k, (layer, expected) in enumerate(zip(grads, grads_expected)):
        for name, a, e in zip(("gx", "gw", "gb", "gbn_weight", "gbn_bias"), layer, expected):
            assert (a is None) == (e is None), (k, name)
            if e is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=f"layer {k} {name}")


def test_layers_reference_runs_the_reference_layer_by_layer():
    x, layers = _layers_problem(np.float64, (1, 1), 3, True, 2, small=True)
    expected = REF.conv2d_batch_norm_training(x, *[a.copy() if hasattr(a, "copy") else a for a in layers[0]])
    expected = [expected, REF.conv2d_batch_norm_training(expected[0], *[a.copy() if hasattr(a, "copy") else a for a in layers[1]])]
    got = REF.conv2d_batch_norm_layers_training(x, layers)
    for out, exp in zip(got, expected):
        for a, e in zip(out, exp):
            np.testing.assert_array_equal(a, e)
    assert not np.array_equal(got[0][0], got[1][0])


def test_cpu_layers_make_one_compiled_call_per_two_layers(monkeypatch):
    """The point of the layers functions: a double conv's kernels in one compiled call each way (three
    layers: one call for two, one for the third); the one-by-one fallback otherwise."""
    cpu = pytest.importorskip("kernels.conv2d_batch_norm.cpu")
    calls = []
    for name in ("_two_layers_forward", "_two_layers_backward", "_conv_then_batch_norm", "_batch_norm_then_conv"):
        original = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    for dtype, stride, c_in, relu, count, needs in LAYERS_CASES:
        calls.clear()
        x, layers = _layers_problem(dtype, stride, c_in, relu, count)
        outputs = cpu.conv2d_batch_norm_layers_training(x, layers)
        saved, h = [], x
        for (w, _, stride_k, padding, dilation, groups, bn_w, *_), (y, xhat, invstd) in zip(layers, outputs):
            saved.append((h, w, xhat, invstd, bn_w, stride_k, padding, dilation, groups, True, y if relu else None))
            h = y
        cpu.conv2d_batch_norm_layers_backward(np.ones_like(h), saved, [needs] + [(True, True, False)] * (count - 1))
        case = (dtype, stride, c_in, count)
        if stride != (1, 1):  # the first layer has no one-call forward or backward: layer by layer, the second in one call each way
            assert calls == ["_conv_then_batch_norm", "_batch_norm_then_conv"], case
        elif dtype == np.float64:  # v5's forward runs float64, v6's grad_weight does not: the backward is separate calls
            assert calls == ["_two_layers_forward"], case
        elif c_in == 3:  # the first layer's grad_weight is not v6: the backward layer by layer, the second in one call
            assert calls == ["_two_layers_forward", "_batch_norm_then_conv"], case
        else:
            expected = ["_two_layers_forward"] + ["_conv_then_batch_norm"] * (count - 2)
            expected += ["_two_layers_backward"] + ["_batch_norm_then_conv"] * (count - 2)
            assert calls == expected, case
