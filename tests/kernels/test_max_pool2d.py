"""max_pool2d kernels: every backend module vs the reference (values, indices, gradient),
and the reference's tie / NaN / -inf rules on hand-made windows (torch-free)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernels.shapes import pool_output_size
from tests.helpers import assert_close, kernel_modules, load, reference, tol

ref = reference("max_pool2d")


pool_out = pool_output_size


def windows_reach_input(size, k, s, p, d, n_out):
    """Every window has a tap inside the input (functional.py rejects the others)."""
    taps = np.arange(n_out)[:, None] * s - p + np.arange(k) * d
    return bool(((taps >= 0) & (taps < size)).any(axis=1).all())


@st.composite
def pool_cases(draw, max_planes=2, max_side=9):
    """Shape and hyper-parameters with a valid output; kernels up to 5 on sides from 1, so
    the kernel is often as large as the padded image."""
    shape = (draw(st.integers(1, max_planes)), draw(st.integers(1, max_planes)))
    shape += (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    ceil_mode = draw(st.booleans())
    out = tuple(pool_out(shape[2 + a], k[a], s[a], p[a], d[a], ceil_mode) for a in range(2))
    assume(min(out) >= 1)
    assume(all(windows_reach_input(shape[2 + a], k[a], s[a], p[a], d[a], out[a]) for a in range(2)))
    return dict(shape=shape, args=(k, s, p, d, ceil_mode), out=out)


def draw_input(data, shape, dtype):
    """Small integers (many ties), sometimes with NaN and -inf sprinkled in."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = rng.integers(-3, 4, shape).astype(dtype)
    if data.draw(st.booleans(), label="nan"):
        x[rng.random(shape) < 0.15] = np.nan
    if data.draw(st.booleans(), label="-inf"):
        x[rng.random(shape) < 0.4] = -np.inf
    return x, rng


@pytest.mark.parametrize("modname", kernel_modules("max_pool2d"))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=15)
@given(case=pool_cases(), data=st.data())
def test_forward_and_backward_match_reference(modname, dtype, case, data):
    mod = load(modname)
    x, rng = draw_input(data, case["shape"], dtype)
    y_ref, idx_ref = ref.max_pool2d_forward(x, *case["args"])
    assert y_ref.shape == case["shape"][:2] + case["out"]

    y, idx = mod.max_pool2d_forward(x, *case["args"])
    # a max selects an input value: exact, NaN where the reference has NaN, same tap
    np.testing.assert_array_equal(np.asarray(y), y_ref, err_msg="y")
    np.testing.assert_array_equal(np.asarray(idx), idx_ref, err_msg="indices")
    assert np.dtype(y.dtype) == dtype and np.dtype(idx.dtype) == np.int64

    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    window = case["args"][:4]  # kernel_size, stride, padding, dilation
    gx = mod.max_pool2d_backward(gy, idx_ref, case["shape"], *window)
    # overlapping windows add up to ceil(k/s)^2 <= 25 gradients per input
    assert_close(gx, ref.max_pool2d_backward(gy, idx_ref, case["shape"], *window), *tol(dtype), name="gx")


@pytest.mark.parametrize("modname", ["kernels.max_pool2d.reference"] + kernel_modules("max_pool2d"))
def test_tie_nan_and_all_minus_inf_windows(modname):
    """One row, windows of 4 (stride 4): ties -> first max; NaN -> last NaN; all -inf -> first
    in-image tap, never the padding (torch's rules)."""
    nan, inf = np.nan, np.inf
    x = np.array([[[[2, 5, 5, 1, 1, nan, 3, nan, -inf, -inf, -inf, -inf]]]])
    y, idx = load(modname).max_pool2d_forward(x, (1, 4), (1, 4), (0, 0), (1, 1), False)
    np.testing.assert_array_equal(np.asarray(y), [[[[5, nan, -inf]]]])
    np.testing.assert_array_equal(np.asarray(idx), [[[[1, 7, 8]]]])
    # padding 1 on the left: the first window is (pad, -inf, -inf) and must pick position 0
    y, idx = load(modname).max_pool2d_forward(x[..., 8:], (1, 3), (1, 3), (0, 1), (1, 1), False)
    np.testing.assert_array_equal(np.asarray(idx), [[[[0, 2]]]])
    assert np.isneginf(np.asarray(y)).all()


@pytest.mark.parametrize("modname", ["kernels.max_pool2d.reference"] + kernel_modules("max_pool2d"))
def test_backward_accumulates_where_windows_share_a_maximum(modname):
    """3x3 windows at stride 1 over a single peak: every window selects it, so it collects all of gy."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 1.0
    y, idx = load(modname).max_pool2d_forward(x, (3, 3), (1, 1), (0, 0), (1, 1), False)
    assert (np.asarray(idx) == 1 * 4 + 2).all()
    gy = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    expected = np.zeros((1, 1, 4, 4))
    expected[0, 0, 1, 2] = gy.sum()
    gx = load(modname).max_pool2d_backward(gy, np.asarray(idx), x.shape, (3, 3), (1, 1), (0, 0), (1, 1))
    assert_close(gx, expected, rtol=0, atol=0)
