"""Bad arguments to minseg.functional.conv2d / conv_transpose2d raise ValueError or TypeError
with a message that names the argument and the expected and actual values."""
import numpy as np
import pytest

import minseg
from minseg.functional import conv2d, conv_transpose2d


def t(*shape, dtype=np.float32):
    return minseg.Tensor(np.zeros(shape, dtype))


X, W = t(1, 4, 6, 6), t(2, 4, 3, 3)  # a valid conv2d pair


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: conv2d(t(4, 6, 6), W), ValueError, r"input must be 4-D .*got shape \(4, 6, 6\)"),
        (lambda: conv2d(X, t(2, 4, 3)), ValueError, r"weight must be 4-D .*got shape \(2, 4, 3\)"),
        (lambda: conv2d(np.zeros((1, 4, 6, 6), np.float32), W), TypeError, "input must be a minseg Tensor, got ndarray"),
        (lambda: conv2d(t(1, 3, 6, 6), W), ValueError, r"weight expects 4 input channels .*input has 3 channels"),
        (lambda: conv2d(X, t(2, 2, 3, 3)), ValueError, r"weight expects 2 input channels .*input has 4 channels"),
        (lambda: conv2d(X, t(3, 2, 3, 3), groups=2), ValueError, "groups=2 must divide in_channels=4 and out_channels=3"),
        (lambda: conv2d(X, t(2, 1, 3, 3), groups=3), ValueError, "groups=3 must divide in_channels=4"),
        (lambda: conv2d(X, W, groups=0), ValueError, "groups must be a positive int, got 0"),
        (lambda: conv2d(X, t(2, 4, 7, 3)), ValueError, r"output size would be \(0, 4\) <= 0"),
        (lambda: conv2d(X, W, dilation=4), ValueError, r"output size would be \(-2, -2\) <= 0.*dilated kernel 9x9"),
        (lambda: conv2d(X, t(2, 4, 3, 3, dtype=np.float64)), TypeError, "weight has dtype float64 but input has dtype float32"),
        (lambda: conv2d(X, W, t(2, dtype=np.float64)), TypeError, "bias has dtype float64 but input has dtype float32"),
        (lambda: conv2d(t(1, 4, 6, 6, dtype=np.int64), W), TypeError, "input must be float32 or float64, got int64"),
        (lambda: conv2d(X, W, t(3)), ValueError, r"bias must have shape \(2,\) .*got \(3,\)"),
        (lambda: conv2d(X, W, stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
        (lambda: conv2d(X, W, stride=(1, 2, 3)), ValueError, r"stride must be an int or a pair of ints, got \(1, 2, 3\)"),
        (lambda: conv2d(X, W, stride=1.5), ValueError, "stride must be an int or a pair of ints, got 1.5"),
        (lambda: conv2d(X, W, padding=-1), ValueError, r"padding must be >= 0, got \(-1, -1\)"),
        (lambda: conv2d(X, W, padding="full"), ValueError, "padding must be an int, a pair, 'same' or 'valid', got 'full'"),
        (lambda: conv2d(X, W, padding="same", stride=2), ValueError, r"padding='same' is not supported for strided .*stride=\(2, 2\)"),
        (lambda: conv2d(X, W, dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    ],
)
def test_conv2d_rejects(call, error, match):
    with pytest.raises(error, match=match):
        call()


XT, WT = t(1, 4, 3, 3), t(4, 2, 3, 3)  # a valid conv_transpose2d pair: 4 -> 2 channels


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: conv_transpose2d(t(4, 3, 3), WT), ValueError, r"input must be 4-D .*got shape \(4, 3, 3\)"),
        (lambda: conv_transpose2d(XT, t(4, 2, 3)), ValueError, r"weight must be 4-D .*got shape \(4, 2, 3\)"),
        (lambda: conv_transpose2d(XT, t(3, 2, 3, 3)), ValueError, r"weight has 3 input channels \(dim 0\) but input has 4"),
        (lambda: conv_transpose2d(t(1, 3, 3, 3), t(3, 2, 3, 3), groups=2), ValueError, "groups=2 must divide in_channels=3"),
        (lambda: conv_transpose2d(XT, WT, groups=-1), ValueError, "groups must be a positive int, got -1"),
        (lambda: conv_transpose2d(XT, WT, t(3)), ValueError, r"bias must have shape \(2,\), got \(3,\)"),
        (lambda: conv_transpose2d(XT, t(4, 2, 3, 3, dtype=np.float64)), TypeError, "weight has dtype float64 but input has dtype float32"),
        (lambda: conv_transpose2d(XT, WT, stride=(0, 1)), ValueError, r"stride must be >= 1, got \(0, 1\)"),
        (lambda: conv_transpose2d(XT, WT, padding="same"), ValueError, "padding must be an int or a pair of ints, got 'same'"),
        (lambda: conv_transpose2d(XT, WT, output_padding=2, stride=2), ValueError, r"output_padding \(2, 2\) must be smaller than either stride \(2, 2\) or dilation \(1, 1\)"),
        (lambda: conv_transpose2d(XT, WT, padding=3), ValueError, r"output size would be \(-1, -1\) <= 0"),
    ],
)
def test_conv_transpose2d_rejects(call, error, match):
    with pytest.raises(error, match=match):
        call()
