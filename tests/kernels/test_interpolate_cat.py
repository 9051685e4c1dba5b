"""interpolate_cat: every backend's fused call is interpolate_forward then cat_forward of the same
backend, bit for bit, and the backward cat_backward then interpolate_backward; the reference is the
composition of the two references; F.interpolate_cat checks its arguments and differentiates."""
from __future__ import annotations

import numpy as np
import pytest

import minseg
from minseg import backend
from minseg import functional as F
from tests.helpers import kernel_modules, load, reference

MODULES = [pytest.param("kernels.interpolate_cat.reference", id="numpy"), *kernel_modules("interpolate_cat")]

# (dtype, x's (C, H, W), out size, mode, align_corners): bilinear x2 is the cpu backend's x2 path (the
# U-Net's), the others its general path; the CUDA simulator runs smaller float32 cases of one image
# (every simulated thread is a Python thread).
CASES = [(np.float32, (3, 5, 6), (10, 12), "bilinear", False), (np.float32, (2, 4, 3), (7, 5), "nearest", False),
         (np.float64, (2, 4, 4), (8, 8), "bilinear", True)]
CUDA_CASES = [(np.float32, (2, 3, 4), (6, 8), "bilinear", False), (np.float32, (1, 3, 2), (4, 3), "nearest", False)]
PARAMS = [pytest.param(m.values[0], *case, id=f"{m.id}-{np.dtype(case[0]).name}-{case[3]}-{case[2][0]}x{case[2][1]}")
          for m in MODULES for case in (CUDA_CASES if m.id == "cuda" else CASES)]


def _problem(dtype, x_chw, out_size, seed=0, n=2):
    rng = np.random.default_rng(seed)
    skip = rng.standard_normal((n, 3, *out_size)).astype(dtype)
    x = rng.standard_normal((n, *x_chw)).astype(dtype)
    gy = rng.standard_normal((n, 3 + x_chw[0], *out_size)).astype(dtype)
    return skip, x, gy


def _ops(modname):
    """The interpolate_cat module of a backend, and that backend's interpolate and cat modules."""
    suffix = modname.rsplit(".", 1)[1]
    return load(modname), load(f"kernels.interpolate.{suffix}"), load(f"kernels.cat.{suffix}")


@pytest.mark.parametrize("modname, dtype, x_chw, out_size, mode, align_corners", PARAMS)
def test_fused_calls_are_the_two_calls_bit_for_bit(modname, dtype, x_chw, out_size, mode, align_corners):
    fused, interpolate, cat = _ops(modname)
    skip, x, gy = _problem(dtype, x_chw, out_size, n=1 if modname.endswith("cuda") else 2)  # the simulator: one image
    scales = (x_chw[1] / out_size[0], x_chw[2] / out_size[1])
    args = (mode, align_corners, scales)
    y = np.asarray(fused.interpolate_cat_forward(skip, x, out_size, *args))
    expected = np.asarray(cat.cat_forward([skip, interpolate.interpolate_forward(x, out_size, *args)], 1))
    np.testing.assert_array_equal(y, expected)
    for needs in ((True, True), (False, True), (True, False)):
        g_skip, gx = fused.interpolate_cat_backward(gy, 3, x.shape, *args, needs)
        e_skip, e_u = cat.cat_backward(gy, (3, x_chw[0]), 1, needs)
        e_x = interpolate.interpolate_backward(e_u, x.shape, *args) if needs[1] else None
        for name, a, e in (("g_skip", g_skip, e_skip), ("gx", gx, e_x)):
            assert (a is None) == (e is None), (name, needs)
            if e is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=f"{name} {needs}")
    assert not np.shares_memory(np.asarray(fused.interpolate_cat_backward(gy, 3, x.shape, *args, (True, False))[0]), gy)


def test_reference_is_the_composition_of_the_references():
    skip, x, gy = _problem(np.float64, (2, 3, 4), (6, 8), seed=1)
    args = ("bilinear", False, (0.5, 0.5))
    y = reference("interpolate_cat").interpolate_cat_forward(skip, x, (6, 8), *args)
    np.testing.assert_array_equal(y[:, :3], skip)
    np.testing.assert_array_equal(y[:, 3:], reference("interpolate").interpolate_forward(x, (6, 8), *args))


def test_functional_matches_interpolate_then_cat_and_its_gradients_are_the_derivatives():
    rng = np.random.default_rng(2)
    skip = minseg.Tensor(rng.standard_normal((2, 2, 6, 4)), requires_grad=True)
    x = minseg.Tensor(rng.standard_normal((2, 3, 3, 2)), requires_grad=True)
    with backend.using("numpy"):
        y = F.interpolate_cat(skip, x, scale_factor=2, mode="bilinear")
        assert y._ctx.function is F.InterpolateCatFunction
        expected = F.cat([skip, F.interpolate(x, scale_factor=2, mode="bilinear")], dim=1)
        np.testing.assert_array_equal(y.numpy(), expected.numpy())
        minseg.gradcheck(lambda s, x: F.interpolate_cat(s, x, size=(6, 4), mode="bilinear", align_corners=True), [skip, x])


@pytest.mark.parametrize("skip_shape, dtype, match", [
    ((2, 2, 6, 5), np.float32, r"skip must have shape \(2, C_s, 6, 4\) to be joined with the resized input, got \(2, 2, 6, 5\)"),
    ((3, 2, 6, 4), np.float32, r"skip must have shape \(2, C_s, 6, 4\)"),
    ((2, 2, 6), np.float32, r"skip must be 4-D"),
    ((2, 2, 6, 4), np.float64, r"skip has dtype float64 but input has dtype float32"),
])
def test_functional_names_a_bad_skip(skip_shape, dtype, match):
    x = minseg.Tensor(np.zeros((2, 3, 3, 2), np.float32))
    with pytest.raises((ValueError, TypeError), match=match):
        F.interpolate_cat(minseg.Tensor(np.zeros(skip_shape, dtype)), x, scale_factor=2, mode="bilinear")
