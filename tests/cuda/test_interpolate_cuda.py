"""interpolate's CUDA kernels: the gather ranges of the backward, and whole outputs vs the reference.

The backward gathers, for input index p of an axis, over the destinations
``[lo[p], hi[p])`` found by binary search on the tap table; the first test
checks on many axis geometries (no kernel launch, so it is cheap) that this
range is exactly the set of destinations that read p -- the property that
makes the gather equal the adjoint. Then the kernels run under the simulator
(<= ~1000 threads) against the reference, with sizes that are not multiples of
the 128-thread block. Outputs are NaN-poisoned (``cuda_common.empty``).

Tolerances: nearest outputs are copies, so they must be exact (a wrong source
index shows). Bilinear and every backward sum a few products in an order that
differs from the reference's: ``tests.helpers.tol`` (float32 rtol 1e-4,
atol 1e-5 -- at most ~9 weighted O(1) terms per element here, a few ulp apart).
"""
import math

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernels.interpolate import cuda as K
from minseg.backend import to_numpy
from tests.helpers import assert_close, reference, tol

R = reference("interpolate")
MODES = ("nearest", "nearest-exact", "bilinear")


@st.composite
def axis_sizes(draw, max_len=60):
    """(n_in, n_out, scale) of one axis, as functional.interpolate derives them."""
    n_in = draw(st.integers(1, max_len))
    if draw(st.booleans()):  # size given: scale = n_in / n_out
        n_out = draw(st.integers(1, max_len))
        return n_in, n_out, n_in / n_out
    # scale_factor given (incl. torch's "almost 2" shortcut case): scale = 1 / factor
    factor = draw(st.sampled_from([0.5, 1 / 3, 1.05, 2.0, 2.04, 3.0]) | st.floats(0.2, 4.0))
    n_out = int(math.floor(n_in * factor))
    assume(n_out >= 1)
    return n_in, n_out, 1.0 / factor


@st.composite
def modes(draw):
    """(mode, align_corners)."""
    mode = draw(st.sampled_from(MODES))
    return mode, mode == "bilinear" and draw(st.booleans())


@settings(max_examples=200)
@given(sizes=axis_sizes(), mode=modes(), dtype=st.sampled_from([np.float32, np.float64]))
def test_gather_range_is_exactly_the_destinations_that_read_each_source(sizes, mode, dtype):
    (n_in, n_out, scale), (mode, align_corners) = sizes, mode
    idx, _, lo, hi = (to_numpy(a) for a in K._axis_tables(n_in, n_out, mode, align_corners, scale, np.dtype(dtype)))
    for p in range(n_in):
        readers = np.flatnonzero((idx == p).any(axis=1))
        np.testing.assert_array_equal(np.arange(lo[p], hi[p]), readers, err_msg=f"source {p}")


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    mode, align_corners = draw(modes())
    h, ho, sh = draw(axis_sizes(max_len=12))
    w, wo, sw = draw(axis_sizes(max_len=12))
    assume(n * c * max(ho * wo, h * w) <= 1000)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    gy = rng.standard_normal((n, c, ho, wo)).astype(dtype)
    return x, gy, (ho, wo), (mode, align_corners, (sh, sw))


@settings(max_examples=10)
@given(problem=problems())
def test_forward_and_backward_match_reference(problem):
    x, gy, out_size, args = problem
    exact = args[0] != "bilinear"
    y = K.interpolate_forward(x, out_size, *args)
    assert y.dtype == x.dtype
    assert_close(y, R.interpolate_forward(x, out_size, *args), *((0, 0) if exact else tol(x.dtype)), name="y")
    gx = K.interpolate_backward(gy, x.shape, *args)
    assert gx.dtype == x.dtype
    assert_close(gx, R.interpolate_backward(gy, x.shape, *args), *tol(x.dtype), name="gx")


def test_bilinear_upsampling_clamps_at_the_right_border():
    """4 -> 11 pixels (align_corners=False): the last destinations read pixel 3 through both taps."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    gy = rng.standard_normal((1, 1, 11, 11)).astype(np.float32)
    args = ("bilinear", False, (4 / 11, 4 / 11))
    assert_close(K.interpolate_forward(x, (11, 11), *args), R.interpolate_forward(x, (11, 11), *args), *tol(np.float32))
    gx = K.interpolate_backward(gy, x.shape, *args)
    assert_close(gx, R.interpolate_backward(gy, x.shape, *args), *tol(np.float32))
