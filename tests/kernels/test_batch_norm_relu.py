"""batch norm fused with ReLU (``relu=True`` / ``relu_output``): every backend module vs the NumPy
reference, whole tensors; the fused kernels against each backend's own unfused batch norm + relu;
and the cpu statistics over planes longer than one chunk.

Shapes stay under ~1000 elements so the CUDA kernels run quickly under the simulator.
Tolerances: ``tests.helpers.tol`` (float32 rtol 1e-4, atol 1e-5), as the unfused batch-norm
tests: the same formulas, evaluated with the roundings in another order.
"""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kernels.batch_norm import cpu as CPU
from tests.helpers import assert_close, kernel_modules, load, reference, tol
from tests.kernels.test_batch_norm import _data, bn_cases

REF = reference("batch_norm")
MODULES = kernel_modules("batch_norm")


def _zeros_after_normalising(x, mean):
    """x with every other value of each plane set to its channel's mean: xhat = 0 exactly there."""
    xp = x.reshape(x.shape[0], x.shape[1], -1).copy()
    xp[:, :, ::2] = mean[None, :, None]
    return xp.reshape(x.shape)


@pytest.mark.parametrize("modname", MODULES)
@settings(max_examples=15)
@given(
    case=bn_cases(),
    dtype=st.sampled_from([np.float32, np.float64]),
    affine=st.booleans(),
    training=st.booleans(),
    zeros=st.booleans(),
)
@example(case=((2, 3, 4, 5), 7), dtype=np.float32, affine=True, training=True, zeros=True)
@example(case=((1, 1), 0), dtype=np.float64, affine=False, training=True, zeros=False)
def test_fused_relu_matches_reference(modname, case, dtype, affine, training, zeros):
    mod = load(modname)
    relu = load(modname.replace("batch_norm", "relu"))
    shape, seed = case
    x, weight, bias, gy = _data(shape, seed, dtype, affine)
    rtol, atol = tol(dtype)
    mean, var = REF.batch_norm_stats(x)
    if zeros:  # the batch norm's output is exactly 0 (no bias): relu'(0) = 0, as torch
        x, bias = _zeros_after_normalising(x, mean), None
    out_ref = REF.batch_norm_forward(x, mean, var, weight, bias, 1e-5, relu=True)
    out = mod.batch_norm_forward(x, mean, var, weight, bias, 1e-5, relu=True)
    for name, a, b in zip(("y", "xhat", "invstd"), out, out_ref):
        assert_close(a, b, rtol, atol, name=name)
        assert np.asarray(a).dtype == dtype
    y_ref, xhat, invstd = out_ref
    assert (y_ref >= 0).all()
    if zeros:
        assert (y_ref.reshape(shape[0], shape[1], -1)[:, :, ::2] == 0).all()
    # the fused forward is this backend's batch norm followed by its relu, to the bit
    np.testing.assert_array_equal(
        np.asarray(out[0]), np.asarray(relu.relu_forward(mod.batch_norm_forward(x, mean, var, weight, bias, 1e-5)[0]))
    )
    grads = mod.batch_norm_backward(gy, xhat, invstd, weight, training, relu_output=y_ref)
    expected = REF.batch_norm_backward(gy, xhat, invstd, weight, training, relu_output=y_ref)
    for name, a, b in zip(("gx", "gweight", "gbias"), grads, expected):
        assert_close(a, b, rtol, atol, name=name)
        assert np.asarray(a).dtype == dtype
    # ... and the fused backward is the batch-norm backward of the relu's gradient
    masked = np.asarray(relu.relu_backward(y_ref, gy))
    for name, a, b in zip(("gx", "gweight", "gbias"), grads, mod.batch_norm_backward(masked, xhat, invstd, weight, training)):
        assert_close(a, b, rtol, atol, name=f"{name} vs unfused")


def test_reference_gradient_is_zero_where_the_output_is_zero():
    """Where y = 0 the gradient of the ReLU is 0: gbias and gweight add gy only where y > 0."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 4))
    gy = rng.standard_normal(x.shape)
    y, xhat, invstd = REF.batch_norm_forward(x, *REF.batch_norm_stats(x), None, None, 1e-5, relu=True)
    _, gweight, gbias = REF.batch_norm_backward(gy, xhat, invstd, None, True, relu_output=y)
    kept = np.where(xhat > 0, gy, 0)
    assert_close(gbias, kept.sum(axis=(0, 2, 3)), 1e-12, 1e-12, name="gbias")
    assert_close(gweight, (kept * xhat).sum(axis=(0, 2, 3)), 1e-12, 1e-12, name="gweight")


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 6e-6), (np.float64, 1e-12)])
def test_cpu_stats_over_several_chunks_are_accurate(dtype, rtol):
    """Planes of 2 chunks and a 5-value tail, std 1, where a fixed centre would cancel: channel 0 has
    mean 1e4 in every chunk (a centre of 0 for any chunk loses its variance); channel 1 steps from 0
    to 1e4 midway (the mean so far, the later chunks' centre, is far from their values). Against float64 two-pass
    statistics: float64 within merge round-off (~1e-15); float32 within the estimate in cpu.py's
    docstring (float32 partial sums, <= 2e-6 of sum d^2, ~3x that of M2 at most)."""
    length = 2 * CPU.CHUNK + 5
    x = np.random.default_rng(0).standard_normal((3, 2, length))
    x[:, 0] += 1e4
    x[:, 1, length // 2 :] += 1e4
    x = x.astype(dtype)
    mean, var = CPU.batch_norm_stats(x)
    x64 = x.astype(np.float64)
    mean64 = x64.mean(axis=(0, 2))
    assert_close(mean, mean64, rtol, 0, name="mean")
    assert_close(var, ((x64 - mean64[:, None]) ** 2).mean(axis=(0, 2)), rtol, 0, name="var")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_cpu_backward_by_channel_and_by_plane_agree_to_the_bit(relu, training):
    """The cpu backward runs one channel per task (C >= threads) or one plane per task (fewer
    channels): both add the same sums in the same order, so they agree exactly, and with the reference."""
    x, weight, _, gy = _data((3, 2, 5, 7), 11, np.float32, affine=True)
    y, xhat, invstd = REF.batch_norm_forward(x, *REF.batch_norm_stats(x), weight, None, 1e-5, relu=relu)
    mask = CPU._planes(y) if relu else None
    results = []
    for kernel in (CPU._backward_by_channel, CPU._backward_by_plane):
        gx, gweight, gbias = np.full_like(gy, np.nan), np.full(2, np.nan, np.float32), np.full(2, np.nan, np.float32)
        kernel(CPU._planes(gy), CPU._planes(xhat), mask, invstd, weight, training, CPU._planes(gx), gweight, gbias)
        results.append((gx, gweight, gbias))
    expected = REF.batch_norm_backward(gy, xhat, invstd, weight, training, relu_output=y if relu else None)
    rtol, atol = tol(np.float32)
    for name, a, b, e in zip(("gx", "gweight", "gbias"), *results, expected):
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert_close(a, e, rtol, atol, name=name)
