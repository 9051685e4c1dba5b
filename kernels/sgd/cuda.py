"""sgd on the GPU: one grid-stride pass over each parameter, in place.

Read ``reference.py`` first for the math; each thread runs ``update.py``'s element
update (the lines the CPU kernel runs) on elements e, e + G, e + 2G, ... of the flat
arrays (G threads in the grid), so a warp reads and writes 32 consecutive addresses
of p, g and b: coalesced, one pass over memory. The grid is capped at
``MAX_BLOCKS`` blocks and strides over larger parameters, so a 10^6-element weight
does not launch 4,000 blocks whose threads update one element each.

The optimizer's parameters and buffers are CuPy arrays on a GPU (NumPy arrays under
the simulator, which copies them to its fake device and back after the launch, so
the writes land in them too). Both are written in place: they must be C-contiguous
device arrays already, never copies (``cc.as_input`` is for the gradient only).

NVVM contracts ``a * b + c`` into a fused multiply-add by default, one rounding where
the reference has two: on a GPU the result may differ from the reference in the last
bit of a term (under the simulator, which computes in NumPy scalars, it does not).
"""
from __future__ import annotations

from numba import cuda

from kernels import cuda_common as cc

from . import update
from .reference import each_step

__all__ = ["sgd_step", "sgd_steps"]

THREADS = 256
# An estimate, not a timing: 4 blocks of 256 threads on each SM of a 132-SM H100 (half
# the 2048 threads an SM holds; python -m benchmarks.ptx_report puts this kernel's
# register limit at 6 such blocks) keep enough loads in flight for a streaming kernel;
# a larger parameter loops instead of launching more blocks.
MAX_BLOCKS = 4 * 132

_update_element = cuda.jit(device=True)(update.update_element)
_rounded = cuda.jit(device=True)(update.rounded)


@cuda.jit
def _sgd_kernel(p, g, b, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """Thread e updates elements e, e + G, ... (G = the grid's threads); b is used only when momentum != 0."""
    lr_t, mu_t, undamped_t, wd_t = _rounded(p, lr, momentum, dampening, weight_decay)
    decay, has_momentum = weight_decay != 0, momentum != 0
    for e in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        _update_element(p, g, b, e, lr_t, mu_t, undamped_t, wd_t, decay, has_momentum, nesterov, first_step)


def sgd_step(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """One SGD step of ``param`` (and ``momentum_buffer``) in place, one launch; returns None.

    ``param`` and ``momentum_buffer`` must be C-contiguous arrays of the device
    (``reshape(-1)`` is then a view, so the writes land in them); without a buffer
    (``momentum`` == 0) the kernel gets the gradient in its place, which it then
    neither reads as a buffer nor writes.
    """
    p = param.reshape(-1)
    g = cc.as_input(grad).reshape(-1)
    b = g if momentum_buffer is None else momentum_buffer.reshape(-1)
    blocks = min(cc.blocks(p.size, THREADS), MAX_BLOCKS)
    _sgd_kernel[blocks, THREADS](p, g, b, update.learning_rate(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(first_step))


PTX_SIGNATURES = [
    (_sgd_kernel, cc.float_signatures("void({t}[::1], {t}[::1], {t}[::1], float64, float64, float64, float64, boolean, boolean)")),
]


def sgd_steps(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """``sgd_step`` of every parameter (see the reference): one launch each, queued one after the other."""
    each_step(sgd_step, params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step)
