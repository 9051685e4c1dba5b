"""max_pool2d's CUDA kernels against the NumPy reference, under the simulator when there is no GPU.

The inputs are small integers, so windows hold ties (the first maximum must
win) and sums of gradients are exact; some draws add NaN (the last NaN of a
window wins) and -inf. Forward outputs and indices must match exactly: a max is
a copy. The backward adds at most kh*kw gradients per input pixel in a
different order than ``np.add.at``: float32 rtol 1e-4 / atol 1e-5 covers a few
roundings of O(1) terms (``tests.helpers.tol``).

Output planes up to 2*3*9*9 = 486 elements span several 128-thread blocks with
a partial last one; outputs are NaN/INT_MAX-poisoned (``cuda_common.empty``).
"""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernels.max_pool2d import cuda as K
from kernels.shapes import pool_output_size
from minseg.backend import to_numpy
from tests.helpers import assert_close, reference, tol

R = reference("max_pool2d")


@st.composite
def pools(draw):
    """(x, kernel_size, stride, padding, dilation, ceil_mode) with every window touching the image."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    ceil_mode = draw(st.booleans())
    for a, size in enumerate((h, w)):
        out = pool_output_size(size, k[a], stride[a], padding[a], dilation[a], ceil_mode)
        assume(out >= 1)
        taps = R._taps(out, stride[a], padding[a], dilation[a], k[a])
        assume((((taps >= 0) & (taps < size)).any(axis=1)).all())  # functional rejects all-padding windows
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(-3, 4, (n, c, h, w)).astype(dtype)
    special = draw(st.sampled_from(["none", "nan", "-inf"]))
    if special != "none":
        x[rng.random(x.shape) < 0.2] = np.nan if special == "nan" else -np.inf
    return x, k, stride, padding, dilation, ceil_mode, rng


@settings(max_examples=25)
@given(problem=pools())
def test_forward_and_backward_match_reference(problem):
    x, *args, rng = problem
    y, idx = K.max_pool2d_forward(x, *args)
    y_ref, idx_ref = R.max_pool2d_forward(x, *args)
    assert y.dtype == x.dtype and idx.dtype == np.uint8  # tap numbers of windows up to 4x4
    assert_close(y, y_ref, rtol=0, atol=0, name="y")
    np.testing.assert_array_equal(to_numpy(idx), idx_ref, err_msg="indices")

    gy = rng.standard_normal(y_ref.shape).astype(x.dtype)
    window = args[:4]  # kernel_size, stride, padding, dilation: v2 scatters or gathers by whether windows overlap
    gx_ref = R.max_pool2d_backward(gy, idx_ref, x.shape, *window)
    for version in K.BACKWARD_VERSIONS:
        gx = K.max_pool2d_backward(gy, idx_ref, x.shape, *window, version=version)
        assert_close(gx, gx_ref, *tol(x.dtype), name=f"gx v{version}")


@pytest.mark.parametrize("version", sorted(K.BACKWARD_VERSIONS))
def test_overlapping_windows_add_up_in_a_fixed_order(version):
    """Stride 1, kernel 3 on a plane with one large value: all 9 windows over it pick it; their gy add up.

    gy values of very different magnitudes make the float sum depend on its order:
    two runs must agree to the bit (no atomics), and match the sum in (i, j) order.
    """
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 2, 2] = 1
    window = ((3, 3), (1, 1), (0, 0), (1, 1))
    y, idx = K.max_pool2d_forward(x, *window, False)
    assert (to_numpy(K.max_pool2d_indices(idx, x.shape, *window)) == 12).all()
    gy = np.array([1e8, 1.0, -1e8, 3.0, 0.5, 7.0, -2.0, 1e-3, 5.0]).astype(np.float32).reshape(y.shape)
    gx = K.max_pool2d_backward(gy, idx, x.shape, *window, version=version)
    expected = np.zeros_like(x)
    in_order = np.float32(0)
    for g in gy.reshape(-1):
        in_order = np.float32(in_order + g)
    expected[0, 0, 2, 2] = in_order
    np.testing.assert_array_equal(to_numpy(gx), expected)
    np.testing.assert_array_equal(to_numpy(K.max_pool2d_backward(gy, idx, x.shape, *window, version=version)), to_numpy(gx))


def test_backward_v2_scatter_with_a_partial_last_window():
    """2x2 stride 2 (no overlap: the zero fill + scatter path), odd sizes and ceil_mode: the last row and
    column of x get no gradient from a full window, the pixels no window picked stay exactly 0."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 7, 5)).astype(np.float32)
    window = ((2, 2), (2, 2), (0, 0), (1, 1))
    y, idx = K.max_pool2d_forward(x, *window, True)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = K.max_pool2d_backward(gy, idx, x.shape, *window, version=2)
    np.testing.assert_array_equal(to_numpy(gx), R.max_pool2d_backward(gy, idx, x.shape, *window))
