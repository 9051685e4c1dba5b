"""interpolate kernels: every backend module vs the reference, the adjoint identity, and
the reference's own invariants and torch-exact index examples (torch-free)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.helpers import assert_close, kernel_modules, load, reference, tol

ref = reference("interpolate")
MODES = ("nearest", "nearest-exact", "bilinear")
# integer, non-integer and "almost 2" factors (2.04 on 10 pixels gives 20 = 2*10 outputs: torch's shortcut)
SCALE_FACTORS = st.one_of(
    st.sampled_from([0.5, 1 / 3, 0.7, 1.0, 1.05, 1.3, 1.7, 2.0, 2.04, 2.5, 3.0]),
    st.floats(0.3, 2.6, allow_nan=False),
)


def resize_args(in_hw, size=None, scale_factor=None):
    """(out_size, scales) as functional.interpolate passes them to the kernels."""
    if size is not None:
        return tuple(size), tuple(n / o for n, o in zip(in_hw, size))
    out = tuple(int(math.floor(n * s)) for n, s in zip(in_hw, scale_factor))
    return out, tuple(1.0 / s for s in scale_factor)


@st.composite
def interp_cases(draw, max_planes=2, max_side=9, max_size=20):
    """A resize problem: input shape, mode, align_corners and either a size or a scale_factor.

    Sizes stay small: the CUDA simulator runs one Python thread per output element
    (<= max_planes**2 * 22**2 < 2000 outputs here).
    """
    n, c = draw(st.integers(1, max_planes)), draw(st.integers(1, max_planes))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    mode = draw(st.sampled_from(MODES))
    align_corners = draw(st.booleans()) if mode == "bilinear" else False
    if draw(st.booleans()):
        size, scale_factor = (draw(st.integers(1, max_size)), draw(st.integers(1, max_size))), None
    else:
        size, scale_factor = None, (draw(SCALE_FACTORS), draw(SCALE_FACTORS))
        assume(all(math.floor(n_in * s) >= 1 for n_in, s in zip((h, w), scale_factor)))
    return dict(shape=(n, c, h, w), mode=mode, align_corners=align_corners, size=size, scale_factor=scale_factor)


def _problem(case, dtype, seed):
    rng = np.random.default_rng(seed)
    out_size, scales = resize_args(case["shape"][2:], case["size"], case["scale_factor"])
    x = rng.standard_normal(case["shape"]).astype(dtype)
    gy = rng.standard_normal(case["shape"][:2] + out_size).astype(dtype)
    return x, gy, out_size, scales


def _exact_or_tol(mode, dtype):
    """Nearest outputs are copies of inputs: any wrong source index shows as an exact mismatch.
    Bilinear sums two products per axis, in an order that may differ per backend: tol()."""
    return (0.0, 0.0) if mode != "bilinear" else tol(dtype)


@pytest.mark.parametrize("modname", kernel_modules("interpolate"))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=12)
@given(case=interp_cases(), seed=st.integers(0, 2**16))
def test_forward_and_backward_match_reference(modname, dtype, case, seed):
    mod = load(modname)
    x, gy, out_size, scales = _problem(case, dtype, seed)
    args = (case["mode"], case["align_corners"], scales)

    y = mod.interpolate_forward(x, out_size, *args)
    rtol, atol = _exact_or_tol(case["mode"], dtype)
    assert_close(y, ref.interpolate_forward(x, out_size, *args), rtol=rtol, atol=atol, name="y")
    assert np.dtype(y.dtype) == dtype

    gx = mod.interpolate_backward(gy, x.shape, *args)
    # backward sums up to ceil(Ho/H)*ceil(Wo/W) (<= 9 here) weighted terms per input pixel
    assert_close(gx, ref.interpolate_backward(gy, x.shape, *args), *tol(dtype), name="gx")
    assert np.dtype(gx.dtype) == dtype


@pytest.mark.parametrize("modname", ["kernels.interpolate.reference"] + kernel_modules("interpolate"))
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=8)
@given(case=interp_cases(), seed=st.integers(0, 2**16))
def test_backward_is_the_adjoint(modname, mode, case, seed):
    """<up(x), g> = <x, up^T(g)> for all x, g: the backward is the transpose of the forward."""
    mod = load(modname)
    align_corners = case["align_corners"] if mode == "bilinear" else False
    x, gy, out_size, scales = _problem(case, np.float64, seed)
    lhs = np.vdot(np.asarray(mod.interpolate_forward(x, out_size, mode, align_corners, scales)), gy)
    rhs = np.vdot(x, np.asarray(mod.interpolate_backward(gy, x.shape, mode, align_corners, scales)))
    # two float64 sums of < 2000 products of O(1) values: ~1e-13 apart at most
    assert abs(lhs - rhs) <= 1e-12 * (1 + abs(lhs)), (lhs, rhs)


@settings(max_examples=30)
@given(
    n_in=st.integers(1, 200),
    n_out=st.integers(1, 200),
    align_corners=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_bilinear_rows_are_a_partition_of_unity_and_align_corners_hits_the_corners(n_in, n_out, align_corners, dtype):
    a = ref.axis_matrix(n_in, n_out, "bilinear", align_corners, n_in / n_out, dtype)
    # each weight pair is (1 - lam, lam) in the working precision: sums to 1 within one rounding
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=0, atol=np.finfo(dtype).eps)
    assert (a >= 0).all()
    if align_corners:
        # the last source coordinate (n_out-1) * ((n_in-1)/(n_out-1)) is n_in-1 up to two roundings
        assert a[0, 0] == 1
        assert n_out == 1 or abs(a[-1, -1] - 1) <= 2 * n_in * np.finfo(dtype).eps


@pytest.mark.parametrize(
    "n_in,n_out,mode,scale,expected",
    [
        # float32 step: 26/22 rounds down, 11 * s = 12.9999994 -> pixel 12 (float64 would give 13)
        (26, 22, "nearest", 26 / 22, {11: 12}),
        # torch's 2x shortcut: d // 2 although floor(2 / 2.04) = 0
        (10, 20, "nearest", 1 / 2.04, {2: 1, 19: 9}),
        # ... and its identity shortcut: 10 -> 10 with scale_factor 1.05 copies
        (10, 10, "nearest", 1 / 1.05, {9: 9}),
        # nearest-exact has no shortcut: floor((2 + 0.5) / 2.04) = 1, floor(19.5 / 2.04) = 9
        (10, 20, "nearest-exact", 1 / 2.04, {2: 1, 0: 0, 19: 9}),
    ],
)
def test_nearest_source_indices_follow_torch_float32_arithmetic(n_in, n_out, mode, scale, expected):
    for dtype in (np.float32, np.float64):  # torch uses float32 coordinates for both
        idx, w = ref.axis_taps(n_in, n_out, mode, False, scale, np.dtype(dtype))
        assert idx.shape == (n_out, 1) and (w == 1).all()
        for d, src in expected.items():
            assert idx[d, 0] == src, (d, idx[:, 0])


def test_nearest_downsampling_gives_unread_pixels_zero_gradient():
    gy = np.ones((1, 1, 2, 2))
    for modname in ["kernels.interpolate.reference"] + [p.values[0] for p in kernel_modules("interpolate")]:
        gx = load(modname).interpolate_backward(gy, (1, 1, 4, 4), "nearest", False, (2.0, 2.0))
        expected = np.zeros((1, 1, 4, 4))
        expected[0, 0, ::2, ::2] = 1
        assert_close(gx, expected, rtol=0, atol=0, name=modname)
