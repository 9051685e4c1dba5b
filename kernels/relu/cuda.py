"""relu on the GPU: one Numba CUDA thread per element.

Read ``reference.py`` first for the math. Both kernels see the arrays as flat
vectors (any shape is C-contiguous here, so element e of the vector is element
e of the tensor): thread e reads and writes element e, so a warp touches 32
consecutive addresses -- fully coalesced, one memory transaction per warp and
array. Each element is read once and written once; relu is pure memory
traffic, and nothing else would make it faster.
"""
from __future__ import annotations

from numba import cuda

from kernels import cuda_common as cc

__all__ = ["relu_forward", "relu_backward"]

THREADS = 256


@cuda.jit
def _relu_forward_kernel(x, y):
    """y[e] = x[e] if x[e] > 0 else 0; a NaN stays NaN (``not v <= 0`` is true for NaN), as torch."""
    e = cuda.grid(1)
    if e < x.size:
        v = x[e]
        y[e] = v if not v <= 0 else x.dtype.type(0)


@cuda.jit
def _relu_backward_kernel(y, gy, gx):
    """gx[e] = gy[e] where the output is positive, else 0 (y == 0 exactly where x <= 0)."""
    e = cuda.grid(1)
    if e < y.size:
        gx[e] = gy[e] if y[e] > 0 else gy.dtype.type(0)


def _launch(kernel, *arrays):
    """Run ``kernel`` on flat views of ``arrays``; the last array is the fresh output, shaped like the first."""
    inputs = [cc.as_input(a) for a in arrays]
    out = cc.empty(inputs[0].shape, inputs[-1].dtype)
    kernel[cc.blocks(out.size, THREADS), THREADS](*[a.reshape(-1) for a in inputs], out.reshape(-1))
    return out


def relu_forward(x):
    """y = max(x, 0), elementwise."""
    return _launch(_relu_forward_kernel, x)


def relu_backward(y, gy):
    """gx = gy * (y > 0): the gradient is 0 at x == 0, as torch."""
    return _launch(_relu_backward_kernel, y, gy)


PTX_SIGNATURES = [
    (_relu_forward_kernel, [f"void({t}[::1], {t}[::1])" for t in ("float32", "float64")]),
    (_relu_backward_kernel, [f"void({t}[::1], {t}[::1], {t}[::1])" for t in ("float32", "float64")]),
]
