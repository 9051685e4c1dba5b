"""avg_pool2d and adaptive_avg_pool2d kernels: every backend module vs the reference (forward and
backward, whole tensors), and the reference's own invariants (torch-free).

The strategies reach the edges on purpose: kernels as large as the padded image, padding up to
k/2, ceil_mode's overhanging last window, stride larger than the kernel (skipped pixels get 0),
every divisor rule; adaptive outputs smaller, equal and larger than the input (overlapping and
repeated windows), including 1x1. The @examples pin the rarest of them.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from kernels.avg_pool2d.windows import adaptive_windows, pool_windows
from kernels.shapes import pool_output_size
from tests.helpers import assert_close, kernel_modules, load, reference, tol

ref = reference("avg_pool2d")


@st.composite
def avg_pool_cases(draw, max_planes=2, max_side=8):
    """dict(shape, args=(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override), out)."""
    shape = (draw(st.integers(1, max_planes)), draw(st.integers(1, max_planes)))
    shape += (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    s = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    ceil_mode, count_include_pad = draw(st.booleans()), draw(st.booleans())
    divisor_override = draw(st.sampled_from([None, None, 3, -2]))
    out = tuple(pool_output_size(shape[2 + a], k[a], s[a], p[a], 1, ceil_mode) for a in range(2))
    assume(min(out) >= 1)
    return dict(shape=shape, args=(k, s, p, ceil_mode, count_include_pad, divisor_override), out=out)


@st.composite
def adaptive_cases(draw, max_planes=2, max_side=8):
    """dict(shape, out): output sides from 1 to beyond the input side."""
    shape = (draw(st.integers(1, max_planes)), draw(st.integers(1, max_planes)))
    shape += (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    return dict(shape=shape, out=(draw(st.integers(1, max_side + 3)), draw(st.integers(1, max_side + 3))))


# ceil_mode with a last window that overhangs the padding, padding counted or not (6 rows, k 3, s 2,
# p 1 -> 4 rows; the last window [5, 8) is cut at H + p = 7: divisor 2 with count_include_pad, not 3);
# stride > kernel (columns skipped)
AVG_EDGES = [
    dict(shape=(1, 2, 6, 6), args=((3, 2), (2, 3), (1, 1), True, False, None), out=(4, 3)),
    dict(shape=(2, 1, 6, 6), args=((3, 2), (2, 3), (1, 1), True, True, None), out=(4, 3)),
    dict(shape=(1, 1, 5, 5), args=((5, 5), (1, 1), (2, 2), False, False, 7), out=(5, 5)),  # every window padded
]
ADAPTIVE_EDGES = [
    dict(shape=(1, 2, 3, 7), out=(8, 3)),  # upsampling rows (repeats), overlapping columns
    dict(shape=(2, 1, 5, 1), out=(1, 4)),  # global mean of rows, a side of 1 repeated
]


def with_examples(edges):
    """@example(case=edge, seed=0) for every edge: run on every test run, before the random draws."""

    def decorate(test):
        for case in edges:
            test = example(case=case, seed=0)(test)
        return test

    return decorate


def random_input(seed, shape, dtype):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype), rng


@pytest.mark.parametrize("modname", kernel_modules("avg_pool2d"))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=15)
@given(case=avg_pool_cases(), seed=st.integers(0, 2**16))
@with_examples(AVG_EDGES)
def test_avg_pool2d_matches_reference(modname, dtype, case, seed):
    mod = load(modname)
    x, rng = random_input(seed, case["shape"], dtype)
    y_ref = ref.avg_pool2d_forward(x, *case["args"])
    assert y_ref.shape == case["shape"][:2] + case["out"]
    y = mod.avg_pool2d_forward(x, *case["args"])
    assert np.dtype(y.dtype) == dtype
    # sums of at most 25 terms in another order
    assert_close(y, y_ref, *tol(dtype), name="y")
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    gx = mod.avg_pool2d_backward(gy, x.shape, *case["args"])
    assert_close(gx, ref.avg_pool2d_backward(gy, x.shape, *case["args"]), *tol(dtype), name="gx")


@pytest.mark.parametrize("modname", kernel_modules("avg_pool2d"))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=15)
@given(case=adaptive_cases(), seed=st.integers(0, 2**16))
@with_examples(ADAPTIVE_EDGES)
def test_adaptive_avg_pool2d_matches_reference(modname, dtype, case, seed):
    mod = load(modname)
    x, rng = random_input(seed, case["shape"], dtype)
    y_ref = ref.adaptive_avg_pool2d_forward(x, case["out"])
    assert y_ref.shape == case["shape"][:2] + case["out"]
    y = mod.adaptive_avg_pool2d_forward(x, case["out"])
    assert np.dtype(y.dtype) == dtype
    assert_close(y, y_ref, *tol(dtype), name="y")
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    gx = mod.adaptive_avg_pool2d_backward(gy, x.shape)
    assert_close(gx, ref.adaptive_avg_pool2d_backward(gy, x.shape), *tol(dtype), name="gx")


# ------------------------------------------------------------ the reference itself


@settings(max_examples=30)
@given(case=avg_pool_cases(), seed=st.integers(0, 2**16))
def test_reference_backward_is_the_adjoint(case, seed):
    """<avg_pool(x), gy> == <x, avg_pool_backward(gy)> for a linear map, in float64 (1e-12 of O(10) sums)."""
    x, rng = random_input(seed, case["shape"], np.float64)
    gy = rng.standard_normal(case["shape"][:2] + case["out"])
    lhs = np.sum(ref.avg_pool2d_forward(x, *case["args"]) * gy)
    rhs = np.sum(x * ref.avg_pool2d_backward(gy, x.shape, *case["args"]))
    assert abs(lhs - rhs) <= 1e-10 * (1 + abs(lhs))


@given(size=st.integers(1, 12), n_out=st.integers(1, 16))
def test_adaptive_windows_cover_the_input_in_order(size, n_out):
    """torch's rule: windows are non-empty, start at 0, end at size, never skip a pixel, and
    windows of an even split (size % n_out == 0) are disjoint blocks of size // n_out."""
    start, end, divisor = adaptive_windows(size, n_out)
    assert start[0] == 0 and end[-1] == size
    assert (end > start).all() and (divisor == end - start).all()
    assert (start[1:] <= end[:-1]).all()  # no gap between consecutive windows
    if size % n_out == 0:
        np.testing.assert_array_equal(start, np.arange(n_out) * (size // n_out))
        np.testing.assert_array_equal(divisor, size // n_out)


def test_pool_windows_count_padding_only_inside_the_padded_input():
    """6 samples, k 3, s 2, p 1, ceil_mode: starts -1, 1, 3, 5; the last window [5, 8) overhangs the
    padded input and is cut at H + p = 7 (one pixel, one padding), so count_include_pad divides it
    by 2, not 3 (torch: avg_pool2d of 1..6 gives [1, 3, 5, 3]), and otherwise by 1."""
    start, end, divisor = pool_windows(6, 3, 2, 1, True, True)
    np.testing.assert_array_equal(start, [0, 1, 3, 5])
    np.testing.assert_array_equal(end, [2, 4, 6, 6])
    np.testing.assert_array_equal(divisor, [3, 3, 3, 2])
    np.testing.assert_array_equal(pool_windows(6, 3, 2, 1, True, False)[2], [2, 3, 3, 1])


def test_constant_input_averages_to_itself_without_padding_in_the_divisor():
    x = np.full((1, 1, 5, 4), 2.5)
    y = ref.avg_pool2d_forward(x, (3, 3), (2, 2), (1, 1), True, False, None)
    assert_close(y, np.full(y.shape, 2.5), rtol=1e-15, atol=0)
    assert_close(ref.adaptive_avg_pool2d_forward(x, (7, 3)), np.full((1, 1, 7, 3), 2.5), rtol=1e-15, atol=0)
