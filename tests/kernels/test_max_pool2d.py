"""max_pool2d kernels: every backend module vs the reference (values, indices, gradient),
and the reference's tie / NaN / -inf rules on hand-made windows (torch-free)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernels.max_pool2d.taps import tap_dtype
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
    np.testing.assert_array_equal(np.asarray(idx), idx_ref, err_msg="indices (tap numbers)")
    assert np.dtype(y.dtype) == dtype and np.dtype(idx.dtype) == np.dtype(idx_ref.dtype) == np.uint8  # kh*kw <= 25
    window = case["args"][:4]  # kernel_size, stride, padding, dilation
    flat, flat_ref = mod.max_pool2d_indices(idx, case["shape"], *window), ref.max_pool2d_indices(idx_ref, case["shape"], *window)
    np.testing.assert_array_equal(np.asarray(flat), flat_ref, err_msg="flat indices")
    assert np.dtype(flat.dtype) == np.int64

    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    gx = mod.max_pool2d_backward(gy, idx_ref, case["shape"], *window)
    # overlapping windows add up to ceil(k/s)^2 <= 25 gradients per input
    assert_close(gx, ref.max_pool2d_backward(gy, idx_ref, case["shape"], *window), *tol(dtype), name="gx")


@pytest.mark.parametrize("modname", ["kernels.max_pool2d.reference"] + kernel_modules("max_pool2d"))
def test_tie_nan_and_all_minus_inf_windows(modname):
    """One row, windows of 4 (stride 4): ties -> first max; NaN -> last NaN; all -inf -> first
    in-image tap, never the padding (torch's rules)."""
    nan, inf = np.nan, np.inf
    mod = load(modname)
    x = np.array([[[[2, 5, 5, 1, 1, nan, 3, nan, -inf, -inf, -inf, -inf]]]])
    window = ((1, 4), (1, 4), (0, 0), (1, 1))
    y, idx = mod.max_pool2d_forward(x, *window, False)
    np.testing.assert_array_equal(np.asarray(y), [[[[5, nan, -inf]]]])
    np.testing.assert_array_equal(np.asarray(idx), [[[[1, 3, 0]]]])  # tap numbers in each window
    np.testing.assert_array_equal(np.asarray(mod.max_pool2d_indices(idx, x.shape, *window)), [[[[1, 7, 8]]]])
    # padding 1 on the left: the first window is (pad, -inf, -inf) and must pick position 0 (its tap 1)
    window = ((1, 3), (1, 3), (0, 1), (1, 1))
    y, idx = mod.max_pool2d_forward(x[..., 8:], *window, False)
    np.testing.assert_array_equal(np.asarray(idx), [[[[1, 0]]]])
    np.testing.assert_array_equal(np.asarray(mod.max_pool2d_indices(idx, x[..., 8:].shape, *window)), [[[[0, 2]]]])
    assert np.isneginf(np.asarray(y)).all()


@pytest.mark.parametrize("modname", ["kernels.max_pool2d.reference"] + kernel_modules("max_pool2d"))
def test_backward_accumulates_where_windows_share_a_maximum(modname):
    """3x3 windows at stride 1 over a single peak: every window selects it, so it collects all of gy."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 1.0
    y, idx = load(modname).max_pool2d_forward(x, (3, 3), (1, 1), (0, 0), (1, 1), False)
    assert (load(modname).max_pool2d_indices(idx, x.shape, (3, 3), (1, 1), (0, 0), (1, 1)) == 1 * 4 + 2).all()
    gy = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    expected = np.zeros((1, 1, 4, 4))
    expected[0, 0, 1, 2] = gy.sum()
    gx = load(modname).max_pool2d_backward(gy, np.asarray(idx), x.shape, (3, 3), (1, 1), (0, 0), (1, 1))
    assert_close(gx, expected, rtol=0, atol=0)


@pytest.mark.parametrize("modname", kernel_modules("max_pool2d"))
@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 2, 7, 9), (3, 1, 2, 2), (1, 1, 3, 1)])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("special", ["ties", "nan", "-inf"])
def test_2x2_stride_2_matches_reference(modname, shape, ceil_mode, special):
    """The U-Net's pool (cpu's specialised path when every window lies inside the image; ceil_mode on an odd
    side adds a partial last window, which takes the general path): values, taps, flat indices and gradient."""
    mod = load(modname)
    rng = np.random.default_rng(sum(shape) + 10 * ceil_mode)
    x = rng.integers(-2, 3, shape).astype(np.float32)  # many ties in every 2x2 window
    if special != "ties":
        x[rng.random(shape) < 0.3] = np.nan if special == "nan" else -np.inf
    window = ((2, 2), (2, 2), (0, 0), (1, 1))
    y, idx = mod.max_pool2d_forward(x, *window, ceil_mode)
    y_ref, idx_ref = ref.max_pool2d_forward(x, *window, ceil_mode)
    np.testing.assert_array_equal(np.asarray(y), y_ref, err_msg="y")
    np.testing.assert_array_equal(np.asarray(idx), idx_ref, err_msg="taps")
    assert np.dtype(idx.dtype) == np.uint8
    flat = mod.max_pool2d_indices(idx, shape, *window)
    np.testing.assert_array_equal(np.asarray(flat), ref.max_pool2d_indices(idx_ref, shape, *window), err_msg="flat")
    gy = rng.standard_normal(y_ref.shape).astype(np.float32)
    gx = mod.max_pool2d_backward(gy, idx, shape, *window)
    # no two windows share a pixel: each gx is one gy or 0, exactly (the odd last row/column get 0)
    assert_close(gx, ref.max_pool2d_backward(gy, idx_ref, shape, *window), rtol=0, atol=0, name="gx")


@pytest.mark.parametrize("modname", ["kernels.max_pool2d.reference"] + kernel_modules("max_pool2d"))
def test_window_of_more_than_256_taps_stores_uint16(modname):
    """A 17x17 window has 289 taps: uint8 cannot number them, so the taps are uint16 (and 256 taps, 16x16,
    still fit uint8). Taps 286..288 lie past 255: a uint8 would wrap them."""
    assert tap_dtype((16, 16)) == np.uint8 and tap_dtype((17, 17)) == np.uint16 and tap_dtype((256, 257)) == np.uint32
    mod = load(modname)
    x = np.zeros((1, 2, 17, 19), np.float32)
    x[0, 0, 16, 16] = 1  # in all three windows (columns j..j+16): their taps (16, 16 - j)
    x[0, 1, 16, 18] = 1  # only in window 2, its last tap; windows 0 and 1 are all 0 and pick their tap 0
    window = ((17, 17), (1, 1), (0, 0), (1, 1))
    y, idx = mod.max_pool2d_forward(x, *window, False)
    assert np.dtype(idx.dtype) == np.uint16
    np.testing.assert_array_equal(np.asarray(idx), [[[[288, 287, 286]], [[0, 0, 288]]]])
    np.testing.assert_array_equal(np.asarray(mod.max_pool2d_indices(idx, x.shape, *window)),
                                  [[[[16 * 19 + 16] * 3], [[0, 1, 16 * 19 + 18]]]])
    gy = np.array([[[[1.0, 2.0, 4.0]], [[8.0, 16.0, 32.0]]]], np.float32)
    expected = np.zeros_like(x)
    expected[0, 0, 16, 16] = 1 + 2 + 4
    expected[0, 1, 0, 0], expected[0, 1, 0, 1], expected[0, 1, 16, 18] = 8, 16, 32
    assert_close(mod.max_pool2d_backward(gy, idx, x.shape, *window), expected, rtol=0, atol=0, name="gx")


@pytest.mark.parametrize("backend_name", ["numpy", "cpu", "cuda"])
def test_return_indices_are_torchs_flat_int64_with_and_without_a_graph(backend_name):
    """F.max_pool2d(..., return_indices=True) returns torch's flat int64 index into each input plane (made
    from the stored taps only then), the same whether the call recorded a graph or ran under no_grad, and
    for a non-contiguous input."""
    import minseg
    from minseg import backend
    from minseg.functional import max_pool2d

    if backend_name not in backend.available_backends():
        pytest.skip(f"backend {backend_name} does not load here")
    rng = np.random.default_rng(8)
    x_np = rng.integers(-3, 4, (3, 2, 9, 8)).astype(np.float32).transpose(1, 0, 2, 3)  # (2, 3, 9, 8), not contiguous
    window = ((3, 2), (2, 2), (1, 0), (1, 2))
    _, taps = ref.max_pool2d_forward(np.ascontiguousarray(x_np), *window, True)
    expected = ref.max_pool2d_indices(taps, x_np.shape, *window)
    with backend.using(backend_name):
        x = minseg.Tensor(x_np, requires_grad=True)
        _, with_graph = max_pool2d(x, *window, ceil_mode=True, return_indices=True)
        with minseg.no_grad():
            _, without = max_pool2d(x, *window, ceil_mode=True, return_indices=True)
    for name, idx in (("with a graph", with_graph), ("under no_grad", without)):
        assert idx.dtype == np.int64, name
        np.testing.assert_array_equal(idx.numpy(), expected, err_msg=name)
