"""Bad arguments to avg_pool2d and adaptive_avg_pool2d fail early with an error naming the argument
(and the checks avg_pool2d shares with max_pool2d: torch raises TypeError for a non-bool flag)."""
import numpy as np
import pytest

import minseg
from minseg.functional import adaptive_avg_pool2d, avg_pool2d, max_pool2d

X = minseg.Tensor(np.zeros((1, 2, 4, 5), np.float32))


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((2,), dict(padding=2), ValueError, r"padding \(2, 2\) must be at most half of kernel_size \(2, 2\)"),
        ((0,), {}, ValueError, "kernel_size must be >= 1"),
        ((2,), dict(stride=0), ValueError, "stride must be >= 1"),
        ((2,), dict(padding=-1), ValueError, "padding must be >= 0"),
        (((2, 2, 2),), {}, ValueError, "kernel_size must be an int or a pair"),
        ((6,), {}, ValueError, r"output size would be \(0, 0\) <= 0"),  # a 6x6 window on a 4x5 image
        ((2,), dict(ceil_mode=1), TypeError, r"ceil_mode must be a bool, got 1 \(int\)"),
        ((2,), dict(count_include_pad=None), TypeError, r"count_include_pad must be a bool, got None"),
        ((2,), dict(divisor_override=0), ValueError, "divisor_override must not be 0"),
        ((2,), dict(divisor_override=2.5), TypeError, r"divisor_override must be None or an int, got 2.5 \(float\)"),
    ],
)
def test_avg_pool2d_rejects(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        avg_pool2d(X, *args, **kwargs)


@pytest.mark.parametrize("ceil_mode", [1, "yes", None])
def test_max_pool2d_ceil_mode_must_be_a_bool_as_in_torch(ceil_mode):
    with pytest.raises(TypeError, match="ceil_mode must be a bool"):
        max_pool2d(X, 2, ceil_mode=ceil_mode)


@pytest.mark.parametrize(
    "output_size,error,match",
    [
        (0, ValueError, r"output_size must be >= 1, got \(0, 0\)"),
        ((3, -1), ValueError, "output_size must be >= 1"),
        ((2, 2, 2), ValueError, "output_size must be an int or a pair"),
        (2.0, ValueError, "output_size must be an int or a pair"),
    ],
)
def test_adaptive_avg_pool2d_rejects(output_size, error, match):
    with pytest.raises(error, match=match):
        adaptive_avg_pool2d(X, output_size)


@pytest.mark.parametrize("op", [lambda t: avg_pool2d(t, 2), lambda t: adaptive_avg_pool2d(t, 2)])
def test_rejects_wrong_ndim_dtype_and_type(op):
    with pytest.raises(ValueError, match=r"input must be 4-D \(N, C, H, W\), got shape \(2, 4, 5\)"):
        op(minseg.Tensor(np.zeros((2, 4, 5), np.float32)))
    with pytest.raises(TypeError, match="input must be float32 or float64, got int64"):
        op(minseg.Tensor(np.zeros((1, 1, 4, 4), np.int64)))
    with pytest.raises(TypeError, match="input must be a minseg Tensor"):
        op(np.zeros((1, 1, 4, 4), np.float32))
