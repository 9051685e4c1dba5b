"""Bad arguments to interpolate and max_pool2d fail early with an error that names the argument."""
import numpy as np
import pytest

import minseg
from minseg.functional import interpolate, max_pool2d

X = minseg.Tensor(np.zeros((1, 2, 4, 5), np.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(size=8, mode="bicubic"), "mode must be one of"),
        (dict(size=8, mode="linear"), "mode must be one of"),
        (dict(size=8, mode="nearest", align_corners=False), "align_corners can only be set with mode='bilinear'"),
        (dict(size=8, mode="nearest-exact", align_corners=True), "align_corners can only be set"),
        (dict(size=8, scale_factor=2.0), "exactly one of size and scale_factor"),
        (dict(), "exactly one of size and scale_factor"),
        (dict(size=0), "size must be >= 1"),
        (dict(size=(3, -1)), "size must be >= 1"),
        (dict(size=2.5), "size must be an int or a pair"),
        (dict(scale_factor=0.1), r"output size \(0, 0\) <= 0 .* scale_factor 0.1"),
        (dict(scale_factor=-2.0), "scale_factor must be a positive number"),
        (dict(scale_factor=(2.0, 2.0, 2.0)), "scale_factor must be a positive number or a pair"),
        (dict(scale_factor=float("inf")), "scale_factor must be a positive number"),
    ],
)
def test_interpolate_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interpolate(X, **kwargs)


def test_interpolate_rejects_wrong_ndim_and_dtype():
    with pytest.raises(ValueError, match=r"input must be 4-D \(N, C, H, W\), got shape \(2, 4, 5\)"):
        interpolate(minseg.Tensor(np.zeros((2, 4, 5), np.float32)), size=3)
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        interpolate(minseg.Tensor(np.zeros((1, 1, 2, 2), np.int64)), size=3)
    with pytest.raises(TypeError, match="input must be a minseg Tensor"):
        interpolate(np.zeros((1, 1, 2, 2)), size=3)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((2,), dict(padding=2), r"padding \(2, 2\) must be at most half of kernel_size \(2, 2\)"),
        (((3, 2),), dict(padding=(1, 2)), "padding .* must be at most half of kernel_size"),
        ((0,), {}, "kernel_size must be >= 1"),
        ((2,), dict(stride=0), "stride must be >= 1"),
        ((2,), dict(padding=-1), "padding must be >= 0"),
        ((2,), dict(dilation=0), "dilation must be >= 1"),
        ((2.0,), {}, "kernel_size must be an int or a pair"),
        ((6,), {}, r"output size would be .* <= 0"),  # a 6x6 window on a 4x5 image
        # taps at -1 and 4 (dilation 5) jump over all 4 rows: torch returns an out-of-range index there
        ((2,), dict(stride=1, padding=1, dilation=5), "reads only padding"),
    ],
)
def test_max_pool2d_rejects(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        max_pool2d(X, *args, **kwargs)


def test_max_pool2d_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=r"input must be 4-D"):
        max_pool2d(minseg.Tensor(np.zeros((4, 5), np.float32)), 2)
