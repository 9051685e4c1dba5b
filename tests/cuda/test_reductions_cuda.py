"""The split per-channel reductions of kernels/cuda_common.py (warp shuffles, Chan's merge,
fixed-order second pass), under the simulator when there is no GPU.

Their users (batch-norm statistics and parameter gradients, conv2d_grad_bias, the
cross-entropy 'mean') are checked against their references in their own test
files; here the building blocks are checked on their own, at the edges: one
channel, partial last splits, a partial last warp of values, and the simulator's
shuffle itself (``minseg.runtime.simulate_warp_shuffles``). Simulated blocks are
one warp (32 threads), so launches stay small.
"""
import numpy as np
import pytest
from numba import cuda, float64

from kernels import cuda_common as cc
from kernels.conv2d import cuda as conv_cuda
from minseg.backend import to_numpy
from tests.helpers import assert_close, reference, tol


@cuda.jit
def _shuffle_probe(values, shifted, sums, merged):
    """Per lane: the value 3 lanes down, the warp_sum total (lane 0), and warp_chan_merge (lane 0)."""
    lane = cuda.threadIdx.x
    v = values[lane]
    shifted[lane] = cuda.shfl_down_sync(cc.FULL_MASK, v, 3)
    total = cc.warp_sum(v)
    n, mean, m2 = cc.warp_chan_merge(float64(1), v, float64(0))
    if lane == 0:
        sums[0] = total
        merged[0] = n
        merged[1] = mean
        merged[2] = m2


def test_warp_shuffle_sum_and_merge():
    values = np.random.default_rng(0).standard_normal(32) * 10 + 100
    shifted = np.full(32, np.nan)
    sums = np.full(1, np.nan)
    merged = np.full(3, np.nan)
    _shuffle_probe[1, 32](values, shifted, sums, merged)
    # lanes past the warp's end read their own value, as on the hardware
    np.testing.assert_array_equal(shifted, np.concatenate([values[3:], values[29:]]))
    assert_close(sums, [values.sum()], 1e-14, 0, name="warp_sum")
    # count, mean and M2 = sum of squared deviations (Chan's merge of 32 one-value sets)
    assert_close(merged, [32, values.mean(), ((values - values.mean()) ** 2).sum()], 1e-12, 0, name="chan merge")


# (n, c, s) for P = the values a split holds at least: 32 threads x 4 loads = 128 under the simulator,
# a whole block's on a GPU; so the shapes split alike on both ((1, 1, 300), (2, 3, 70), (3, 2, 129) at 128)
SPLIT_SHAPES = [(lambda per: (1, 1, 1), 1), (lambda per: (1, 1, 2 * per + 44), 3),
                (lambda per: (2, 3, (per + 12) // 2), 2), (lambda per: (3, 2, per + 1), 4)]


@pytest.mark.parametrize("shape_for, n_splits", SPLIT_SHAPES)
def test_channel_sums_over_splits(shape_for, n_splits):
    """Sums of a and a*b per channel: one value; one channel in 3 splits (the last partial);
    a partial last step of UNROLL loads; splits that cross image boundaries (n*S + s numbering)."""
    per = cc.split_threads() * cc.UNROLL
    shape = shape_for(per)
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    n, c, s = shape
    assert cc.splits(c, n * s, per) == n_splits
    sums = cc.channel_sums(a, b)
    expected = np.stack([a.sum(axis=(0, 2), dtype=np.float64), (a.astype(np.float64) * b).sum(axis=(0, 2))])
    assert sums.dtype == np.float32
    # float64 sums rounded once to float32: within one float32 rounding of the float64 reference
    assert_close(sums, expected, 1e-6, 1e-6, name="channel sums")
    np.testing.assert_array_equal(to_numpy(cc.channel_sums(a, b)), to_numpy(sums))  # fixed order: the same bits every run
    assert (cc.channel_sums(a)[1] == 0).all()
    # with a mask (batch norm + ReLU's backward): a counts only where mask > 0; exact zeros are masked
    mask = rng.standard_normal(shape).astype(np.float32)
    mask.flat[::5] = 0
    kept = np.where(mask > 0, a, 0).astype(np.float64)
    expected = np.stack([kept.sum(axis=(0, 2)), (kept * b).sum(axis=(0, 2))])
    assert_close(cc.channel_sums(a, b, mask), expected, 1e-6, 1e-6, name="masked channel sums")


def test_sum_partials_over_more_splits_than_threads():
    """(Q, C, splits) with 70 splits > one warp: each thread adds several in turn, then the tree."""
    partials = np.random.default_rng(1).standard_normal((2, 3, 70))
    out = cc.sum_partials(partials, np.float64)
    assert_close(out, partials.sum(axis=2), 1e-13, 1e-13, name="sum over splits")


def test_conv_grad_bias_over_splits():
    """M = 2 * 150 = 300 values per channel: three splits, then the fixed-order pass."""
    gy = np.random.default_rng(2).standard_normal((2, 2, 15, 10)).astype(np.float32)
    R = reference("conv2d")
    assert_close(conv_cuda.conv2d_grad_bias(gy), R.conv2d_grad_bias(gy), *tol(np.float32), name="grad_bias")


@pytest.mark.parametrize("shape", [(16, 64, 128, 128), (8, 16, 256, 256), (16, 128, 64, 64)])
def test_issue_shapes_get_two_blocks_per_sm_on_a_gpu(shape):
    """On an H100 (132 SMs) with REDUCE_BLOCK threads per block: channels x splits >= 2 blocks per SM."""
    n, c, h, w = shape
    blocks = c * cc.splits(c, n * h * w, cc.REDUCE_BLOCK * cc.UNROLL)
    assert blocks >= 2 * 132
