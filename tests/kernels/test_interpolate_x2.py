"""The cpu interpolate's x2 fast path: taken exactly where the taps follow the x2 pattern, and
bit for bit the general path's result there (same taps, weights and order of the sums); both
paths vs the reference and, where installed, torch, on the x2 shapes and on those that fall back."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minseg
from kernels.interpolate import cpu
from minseg import backend
from minseg.functional import interpolate
from tests.helpers import assert_close, reference, tol
from tests.kernels.test_interpolate import resize_args

ref = reference("interpolate")
X2 = ("bilinear", False, (0.5, 0.5))  # mode, align_corners, scales of scale_factor=2 (and of size=2*in)


def _general(fn, *args):
    """fn(*args) with the fast path switched off: the general kernels' result."""
    with mock.patch.object(cpu, "_x2_patterns", return_value=None):
        return fn(*args)


def _assert_identical(actual, expected, name):
    """Same shape, dtype and bits (NaN only where expected has NaN: NaN payloads may differ)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan, err_msg=f"{name}: NaN positions")
    bits = np.uint32 if actual.dtype == np.float32 else np.uint64
    np.testing.assert_array_equal(actual.view(bits)[~nan], expected.view(bits)[~nan], err_msg=f"{name}: bits")


@pytest.mark.parametrize("in_hw", [(16, 16), (32, 32), (3, 3), (5, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_x2_path_is_taken_for_exact_x2_bilinear(in_hw, dtype):
    # (16, 16) and (32, 32) are the benchmark U-Net's two upsamplings; size=2*in gives the same scales
    for out_hw, scales in (resize_args(in_hw, scale_factor=(2.0, 2.0)), resize_args(in_hw, size=(2 * in_hw[0], 2 * in_hw[1]))):
        assert scales == (0.5, 0.5)
        assert cpu.interpolate_path(dtype, in_hw, out_hw, "bilinear", False, scales) == "x2"


@pytest.mark.parametrize("how", [dict(scale_factor=2), dict(size=(32, 32))])
def test_functional_interpolate_takes_the_x2_path(how):
    """The U-Net's Upsample(scale_factor=2) and resizes to a skip's size reach the kernels as x2."""
    x = minseg.Tensor(np.ones((8, 64, 16, 16), np.float32), requires_grad=True)
    with mock.patch.object(cpu, "_x2_patterns", side_effect=cpu._x2_patterns) as spy, backend.using("cpu"):
        y = interpolate(x, mode="bilinear", align_corners=False, **how)
        y.backward(minseg.Tensor(np.ones(y.shape, np.float32)))
    assert spy.call_count == 2  # the forward's and the backward's choice of kernels
    for args, _ in spy.call_args_list:
        assert cpu.interpolate_path(*args) == "x2", args


@pytest.mark.parametrize(
    "in_hw,out_hw,mode,align_corners,scales,why",
    [
        ((1, 8), (2, 16), "bilinear", False, (0.5, 0.5), "1-pixel axis"),
        ((8, 2), (16, 4), "bilinear", False, (0.5, 0.5), "2-pixel axis"),
        ((8, 8), (16, 16), "bilinear", True, (0.5, 0.5), "align_corners=True"),
        ((8, 8), (16, 16), "nearest", False, (0.5, 0.5), "nearest"),
        ((10, 10), (20, 20), "bilinear", False, (1 / 2.04, 1 / 2.04), "2n outputs from scale_factor=2.04"),
        ((8, 8), (16, 8), "bilinear", False, (0.5, 1.0), "x2 on one axis only"),
        ((8, 8), (16, 17), "bilinear", False, (0.5, 8 / 17), "x2 by 2.125"),
        ((16, 16), (8, 8), "bilinear", False, (2.0, 2.0), "downsampling"),
    ],
)
def test_other_resizes_take_the_general_path(in_hw, out_hw, mode, align_corners, scales, why):
    assert cpu.interpolate_path(np.float32, in_hw, out_hw, mode, align_corners, scales) == "general", why


@st.composite
def x2_problems(draw):
    """x, gy for an x2 upsampling; sides mostly >= 3 (the fast path) but also 1 and 2 (fallback)."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return rng.standard_normal((n, c, h, w)).astype(dtype), rng.standard_normal((n, c, 2 * h, 2 * w)).astype(dtype)


def _with_specials(x, gy):
    """The problem with inf, -inf and NaN at the corners and on the second row/column: a zero
    weight times inf is NaN, so a path that skipped or added a tap would show."""
    x, gy = x.copy(), gy.copy()
    for a, values in ((x, (np.inf, -np.inf, np.nan)), (gy, (-np.inf, np.nan, np.inf))):
        a[..., 0, 0], a[..., -1, 1 % a.shape[-1]], a[..., 1 % a.shape[-2], -1] = values
    return x, gy


@settings(max_examples=25)
@given(problem=x2_problems(), specials=st.booleans())
@example(problem=(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 6, 6), np.float32)), specials=True)
@example(problem=(np.ones((2, 1, 4, 7)), np.ones((2, 1, 8, 14))), specials=True)
@example(problem=(np.ones((1, 2, 1, 5), np.float32), np.ones((1, 2, 2, 10), np.float32)), specials=False)
def test_x2_path_gives_the_general_paths_bits(problem, specials):
    x, gy = _with_specials(*problem) if specials else problem
    out_hw = gy.shape[2:]
    fast = min(x.shape[2:]) >= 3
    assert cpu.interpolate_path(x.dtype, x.shape[2:], out_hw, *X2) == ("x2" if fast else "general")
    _assert_identical(cpu.interpolate_forward(x, out_hw, *X2), _general(cpu.interpolate_forward, x, out_hw, *X2), "y")
    gx = cpu.interpolate_backward(gy, x.shape, *X2)
    _assert_identical(gx, _general(cpu.interpolate_backward, gy, x.shape, *X2), "gx")


# The brief's shapes: x2 on both axes (fast: odd, even, 3-pixel, the benchmark's 16x16) and the
# fallbacks next to it (1- and 2-pixel axes, align_corners=True, nearest, x2 on one axis).
CASES = [
    ((8, 64, 16, 16), (32, 32), "bilinear", False, "x2"),
    ((2, 3, 7, 5), (14, 10), "bilinear", False, "x2"),
    ((1, 2, 3, 4), (6, 8), "bilinear", False, "x2"),
    ((2, 2, 1, 6), (2, 12), "bilinear", False, "general"),
    ((2, 2, 2, 2), (4, 4), "bilinear", False, "general"),
    ((2, 3, 7, 5), (14, 10), "bilinear", True, "general"),
    ((2, 3, 7, 5), (14, 10), "nearest", False, "general"),
    ((2, 3, 7, 5), (14, 5), "bilinear", False, "general"),
]


def _case(shape, out_hw, dtype):
    rng = np.random.default_rng(sum(shape) + out_hw[1])
    scales = tuple(i / o for i, o in zip(shape[2:], out_hw))
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape[:2] + out_hw).astype(dtype), scales


@pytest.mark.parametrize("shape,out_hw,mode,align_corners,path", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_paths_match_the_reference(shape, out_hw, mode, align_corners, path, dtype):
    x, gy, scales = _case(shape, out_hw, dtype)
    args = (mode, align_corners, scales)
    assert cpu.interpolate_path(dtype, shape[2:], out_hw, *args) == path
    # the reference applies the H taps before the W taps (the kernels: W, then H), and its
    # backward is a dense matrix product: the same <= 4 (forward) / <= 16 (backward) products
    # per output, summed in another order -> tol(dtype), the bound every backend test uses
    y = cpu.interpolate_forward(x, out_hw, *args)
    assert_close(y, ref.interpolate_forward(x, out_hw, *args), *tol(dtype), name="y")
    gx = cpu.interpolate_backward(gy, x.shape, *args)
    assert_close(gx, ref.interpolate_backward(gy, x.shape, *args), *tol(dtype), name="gx")


@pytest.mark.parametrize("shape,out_hw,mode,align_corners,path", CASES)
def test_both_paths_match_torch(shape, out_hw, mode, align_corners, path):
    torch = pytest.importorskip("torch", reason="the torch oracle needs torch; minseg itself never does")
    x, gy, scales = _case(shape, out_hw, np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.interpolate(
        tx, size=out_hw, mode=mode, align_corners=align_corners if mode == "bilinear" else None
    )
    ty.backward(torch.from_numpy(gy))
    args = (mode, align_corners, scales)
    assert cpu.interpolate_path(np.float32, shape[2:], out_hw, *args) == path
    # float32 values ~N(0, 1): y sums 4 products, gx up to 16, in torch's order, not ours: a few
    # ulp of values < ~10, so 1e-5 (y) and 1e-4 (gx) absolute, as tests/oracle/test_interpolate_oracle.py
    assert_close(cpu.interpolate_forward(x, out_hw, *args), ty.detach().numpy(), rtol=1e-5, atol=1e-5, name="y")
    assert_close(cpu.interpolate_backward(gy, x.shape, *args), tx.grad.numpy(), rtol=1e-4, atol=1e-4, name="gx")
