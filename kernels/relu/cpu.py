"""relu on the CPU: one parallel Numba loop over the flat array.

Read ``reference.py`` first for the math. Every array here is C-contiguous, so
element e of the flat view is element e of the tensor; ``prange`` splits the
elements between threads and LLVM vectorises each thread's contiguous range
(compare + select). relu is pure memory traffic: one read and one write per
element.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["relu_forward", "relu_backward"]


@njit(parallel=True, cache=True)
def _relu_forward_kernel(x, y):
    """y[e] = x[e] if x[e] > 0 else 0; a NaN stays NaN (``not v <= 0`` holds for NaN), as torch."""
    zero = x.dtype.type(0)
    for e in prange(x.size):
        v = x[e]
        y[e] = v if not v <= 0 else zero


@njit(parallel=True, cache=True)
def _relu_backward_kernel(y, gy, gx):
    """gx[e] = gy[e] where y[e] > 0 (exactly where x > 0), else 0."""
    zero = gy.dtype.type(0)
    for e in prange(y.size):
        gx[e] = gy[e] if y[e] > 0 else zero


def relu_forward(x):
    """y = max(x, 0), elementwise."""
    y = np.empty_like(x)
    _relu_forward_kernel(x.reshape(-1), y.reshape(-1))
    return y


def relu_backward(y, gy):
    """gx = gy where y > 0, else 0."""
    gx = np.empty_like(gy)
    _relu_backward_kernel(y.reshape(-1), gy.reshape(-1), gx.reshape(-1))
    return gx
