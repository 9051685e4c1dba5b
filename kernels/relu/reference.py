"""ReLU: the NumPy definition.

    y = max(x, 0)
    dy/dx = 1 where x > 0, else 0

ReLU is not differentiable at 0; like torch we take the derivative there to be
0. The backward only needs the output: y > 0 exactly where x > 0, so the input
need not be kept.
"""
from __future__ import annotations

import numpy as np

__all__ = ["relu_forward", "relu_backward"]


def relu_forward(x):
    """y = max(x, 0) (np.maximum keeps NaN, as torch)."""
    return np.maximum(x, x.dtype.type(0))


def relu_backward(y, gy):
    """gx = gy where y > 0 (i.e. x > 0), else 0."""
    return np.where(y > 0, gy, 0).astype(gy.dtype)
