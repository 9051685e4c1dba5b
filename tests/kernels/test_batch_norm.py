"""batchnorm kernels: every backend module vs the NumPy reference, plus invariants.

Shapes stay under ~1000 elements so CUDA kernels run quickly under the simulator.
"""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.helpers import assert_close, kernel_modules, load, reference, tol

REF = reference("batch_norm")
MODULES = kernel_modules("batch_norm")
ALL_MODULES = [pytest.param("kernels.batch_norm.reference", id="numpy")] + MODULES

dtypes = st.sampled_from([np.float32, np.float64])


@st.composite
def bn_cases(draw):
    """(N, C) or (N, C, L) or (N, C, H, W) with sizes including 1, and a seed."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    spatial = tuple(draw(st.lists(st.integers(1, 7), max_size=2)))
    return (n, c) + spatial, draw(st.integers(0, 2**32 - 1))


def _data(shape, seed, dtype, affine):
    rng = np.random.default_rng(seed)
    # an offset and a scale per channel, so the statistics are not ~(0, 1) already
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, bshape) + rng.uniform(-5, 5, bshape)
    weight = rng.standard_normal(c).astype(dtype) if affine else None
    bias = rng.standard_normal(c).astype(dtype) if affine else None
    return x.astype(dtype), weight, bias, rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("modname", MODULES)
@given(case=bn_cases(), dtype=dtypes, affine=st.booleans(), training=st.booleans(), eps=st.sampled_from([1e-5, 0.1]))
def test_batchnorm_matches_reference(modname, case, dtype, affine, training, eps):
    mod = load(modname)
    shape, seed = case
    x, weight, bias, gy = _data(shape, seed, dtype, affine)
    rtol, atol = tol(dtype)
    mean_ref, var_ref = REF.batch_norm_stats(x)
    mean, var = mod.batch_norm_stats(x)
    assert_close(mean, mean_ref, rtol, atol, name="mean")
    assert_close(var, var_ref, rtol, atol, name="var")
    if not training:  # eval mode normalises with given (running) statistics
        mean_ref = mean_ref + np.asarray(0.5, dtype)
        var_ref = var_ref * np.asarray(2.0, dtype)
    out_ref = REF.batch_norm_forward(x, mean_ref, var_ref, weight, bias, eps)
    out = mod.batch_norm_forward(x, mean_ref, var_ref, weight, bias, eps)
    for name, a, b in zip(("y", "xhat", "invstd"), out, out_ref):
        assert_close(a, b, rtol, atol, name=name)
        assert np.asarray(a).dtype == dtype
    _, xhat, invstd = out_ref
    grads = mod.batch_norm_backward(gy, xhat, invstd, weight, training)
    # gx sums ~M = up to 147 products per channel: float32 drift is a few 1e-6 relative
    for name, a, b in zip(("gx", "gweight", "gbias"), grads, REF.batch_norm_backward(gy, xhat, invstd, weight, training)):
        assert_close(a, b, rtol, atol, name=name)
        assert np.asarray(a).dtype == dtype


@pytest.mark.parametrize("modname", ALL_MODULES)
@given(
    case=bn_cases(), dtype=dtypes, affine=st.booleans(), relu=st.booleans(),
    running=st.sampled_from(["both", "mean", "var", "none"]), momentum=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_training_call_is_the_statistics_their_running_update_and_the_forward(modname, case, dtype, affine, relu, running, momentum):
    # batch_norm_training, one call per layer of a training step, must be exactly batch_norm_stats,
    # then batch_norm_forward with those statistics, and update the running statistics in place:
    #   running_mean <- (1 - m) running_mean + m mean,  running_var <- (1 - m) running_var + m M/(M-1) var
    mod = load(modname)
    shape, seed = case
    count = int(np.prod(shape)) // shape[1]
    assume(count > 1)  # functional.py rejects training with one value per channel before any kernel
    x, weight, bias, _ = _data(shape, seed, dtype, affine)
    rng = np.random.default_rng(seed + 1)
    old_mean = rng.standard_normal(shape[1]).astype(dtype)
    old_var = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
    running_mean = old_mean.copy() if running in ("both", "mean") else None
    running_var = old_var.copy() if running in ("both", "var") else None
    out = mod.batch_norm_training(x, weight, bias, running_mean, running_var, momentum, 1e-5, relu)
    mean, var = mod.batch_norm_stats(x)
    expected = mod.batch_norm_forward(x, mean, var, weight, bias, 1e-5, relu)
    for name, a, b in zip(("y", "xhat", "invstd"), out, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        assert np.asarray(a).dtype == dtype
    rtol, atol = tol(dtype)  # one to three roundings in the array's dtype (a fused multiply-add on a GPU)
    mean, var = np.asarray(mean).astype(np.float64), np.asarray(var).astype(np.float64)
    if running_mean is not None:
        assert_close(running_mean, (1 - momentum) * old_mean + momentum * mean, rtol, atol, name="running_mean")
    if running_var is not None:
        assert_close(running_var, (1 - momentum) * old_var + momentum * count / (count - 1) * var, rtol, atol, name="running_var")


@pytest.mark.parametrize("modname", ALL_MODULES)
@given(case=bn_cases(), dtype=dtypes)
def test_training_output_is_normalised_and_gradient_sums_to_zero(modname, case, dtype):
    mod = load(modname)
    shape, seed = case
    x, weight, bias, gy = _data(shape, seed, dtype, affine=True)
    axes = (0,) + tuple(range(2, len(shape)))
    mean, var = mod.batch_norm_stats(x)
    y, xhat, invstd = mod.batch_norm_forward(x, mean, var, None, None, 1e-5)
    y64 = np.asarray(y, np.float64)
    rtol, atol = tol(dtype)
    # per channel: mean 0 and (biased) variance var / (var + eps)
    assert_close(y64.mean(axis=axes), np.zeros(shape[1]), 0, 10 * atol, name="mean of y")
    expected_var = np.asarray(var, np.float64) / (np.asarray(var, np.float64) + 1e-5)
    assert_close(y64.var(axis=axes), expected_var, 10 * rtol, 10 * atol, name="var of y")
    # training-mode gx = invstd w (gy - mean gy - xhat mean(gy xhat)) sums to 0 per channel
    gx, _, _ = mod.batch_norm_backward(gy, xhat, invstd, weight, True)
    scale = np.abs(np.asarray(gy, np.float64)).sum(axis=axes) * np.abs(weight) * invstd
    assert (np.abs(np.asarray(gx, np.float64).sum(axis=axes)) <= 10 * atol * (1 + scale)).all()


@pytest.mark.parametrize("modname", ALL_MODULES)
def test_stats_of_float32_with_large_mean_are_accurate(modname):
    """mean 1e4, std 1: a one-pass float32 E[x^2] - E[x]^2 would lose every digit of var."""
    mod = load(modname)
    x = (1e4 + np.random.default_rng(0).standard_normal((4, 2, 12, 10))).astype(np.float32)
    mean, var = mod.batch_norm_stats(x)
    x64 = x.astype(np.float64)
    assert_close(mean, x64.mean(axis=(0, 2, 3)), 1e-6, 0, name="mean")
    assert_close(var, x64.var(axis=(0, 2, 3)), 1e-5, 0, name="var")
