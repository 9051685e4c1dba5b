"""Batch-norm CUDA kernels against the NumPy reference, under the simulator when there is no GPU.

The per-channel reductions run a grid of channels x splits (``cuda_common.splits``);
under the simulator a block is one warp of 32 threads, each loading UNROLL = 4
values per step, so a split covers at least 128 values and M = N*S of ~300 gives
3 splits per channel, the last partial, and threads without values. Warp shuffles
and barriers are slow in the simulator, so C <= 3. Outputs are NaN-poisoned
(``cuda_common.empty``): an unwritten element fails.

Tolerances (``tests.helpers.tol``): float32 rtol 1e-4, atol 1e-5. Both sides
accumulate in float64 (the kernels per thread, merged by shuffles and over the
splits, Chan's merge for the variance; the reference pairwise, two-pass), so the
statistics agree to float32 rounding; the
elementwise formulas are the reference's, evaluated with one or two roundings
in a different order. The inputs have |mean| up to 10 std, where a one-pass
variance would already lose digits.
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.batch_norm import cuda as K
from minseg.backend import to_numpy
from tests.helpers import assert_close, reference, tol

R = reference("batch_norm")


@st.composite
def batches(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n, c = draw(st.integers(1, 3), label="n"), draw(st.integers(1, 3), label="c")
    spatial = draw(st.lists(st.integers(1, 10), min_size=0, max_size=2), label="spatial")
    shape = (n, c, *spatial)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.sampled_from([0.0, 10.0]))
    x = (rng.standard_normal(shape) + offset * rng.standard_normal((1, c) + (1,) * len(spatial))).astype(dtype)
    weight = rng.standard_normal(c).astype(dtype) if draw(st.booleans()) else None
    bias = rng.standard_normal(c).astype(dtype) if draw(st.booleans()) else None
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    return x, weight, bias, eps, rng


@settings(max_examples=8)
@given(batch=batches(), training=st.booleans())
def test_stats_forward_and_backward_match_reference(batch, training):
    x, weight, bias, eps, rng = batch
    dtype, c = x.dtype, x.shape[1]
    if training:
        mean, var = K.batch_norm_stats(x)
        mean_ref, var_ref = R.batch_norm_stats(x)
        assert mean.dtype == dtype and var.dtype == dtype
        assert_close(mean, mean_ref, *tol(dtype), name="mean")
        # var is a mean of squares of O(std) deviations: relative agreement, no cancellation
        assert_close(var, var_ref, *tol(dtype), name="var")
    else:  # running statistics: any mean, any positive var
        mean_ref = rng.standard_normal(c).astype(dtype)
        var_ref = rng.uniform(0.1, 3.0, c).astype(dtype)

    y, xhat, invstd = K.batch_norm_forward(x, mean_ref, var_ref, weight, bias, eps)
    y_ref, xhat_ref, invstd_ref = R.batch_norm_forward(x, mean_ref, var_ref, weight, bias, eps)
    assert_close(invstd, invstd_ref, *tol(dtype), name="invstd")
    assert_close(xhat, xhat_ref, *tol(dtype), name="xhat")
    assert_close(y, y_ref, *tol(dtype), name="y")

    if training and x.size == c:
        return  # one value per channel: functional rejects training, xhat is 0/0-like
    gy = rng.standard_normal(x.shape).astype(dtype)
    got = K.batch_norm_backward(gy, xhat_ref, invstd_ref, weight, training)
    expected = R.batch_norm_backward(gy, xhat_ref, invstd_ref, weight, training)
    for name, a, b in zip(("gx", "gweight", "gbias"), got, expected):
        assert a.dtype == dtype
        assert_close(a, b, *tol(dtype), name=name)


def _per_split() -> int:
    """Values one split of a channel holds at least: 32 threads x 4 loads = 128 under the simulator, a
    whole block's on a GPU (the shapes below are sized by it, so they split alike on both)."""
    return K.cc.split_threads() * K.cc.UNROLL


def test_reduction_splits_each_channel():
    """M = 2 * (S + 22) values per channel: 3 splits of S = _per_split() (the last partial), merged in a
    fixed order (300 values under the simulator)."""
    per = _per_split()
    assert K.cc.splits(2, 2 * (per + 22), per) == 3
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 2, 1, per + 22)) * 3 + 7).astype(np.float32)
    for a, b in zip(K.batch_norm_stats(x), R.batch_norm_stats(x)):
        assert_close(a, b, *tol(np.float32))
    _, xhat, invstd = R.batch_norm_forward(x, *R.batch_norm_stats(x), None, None, 1e-5)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    expected = R.batch_norm_backward(gy, xhat, invstd, None, True)
    for a, b in zip(K.batch_norm_backward(gy, xhat, invstd, None, True), expected):
        assert_close(a, b, *tol(np.float32))


def test_one_channel_many_splits_far_from_zero():
    """One channel, M = 7 S + 104 (8 splits of S = _per_split(); 1000 under the simulator): the split
    merge (Chan) keeps the variance of data with |mean| = 1e4 std as accurate as the reference's two
    passes; and every run gives the same bits."""
    rng = np.random.default_rng(6)
    per = _per_split()
    x = (rng.standard_normal((1, 1, 7 * per + 104)) + 1e4).astype(np.float32)
    assert K.cc.splits(1, x.size, per) == 8
    mean, var = K.batch_norm_stats(x)
    mean_ref, var_ref = R.batch_norm_stats(x)
    assert_close(mean, mean_ref, *tol(np.float32), name="mean")
    assert_close(var, var_ref, *tol(np.float32), name="var")
    again = K.batch_norm_stats(x)
    np.testing.assert_array_equal(to_numpy(again[0]), to_numpy(mean))
    np.testing.assert_array_equal(to_numpy(again[1]), to_numpy(var))
    gy = rng.standard_normal(x.shape).astype(np.float32)
    _, xhat, invstd = R.batch_norm_forward(x, mean_ref, var_ref, None, None, 1e-5)
    for name, a, b in zip(("gx", "gweight", "gbias"), K.batch_norm_backward(gy, xhat, invstd, None, True),
                          R.batch_norm_backward(gy, xhat, invstd, None, True)):
        assert_close(a, b, *tol(np.float32), name=name)
