"""sgd on the CPU: one compiled pass over each parameter, in place.

Read ``reference.py`` first for the math. The reference makes 2-9 NumPy calls per
parameter and step, each a pass over memory and most a temporary array; here one loop
reads p, g and b and writes p and b once per element (``_update_range``, running
``update.py``'s element update, which ``cuda.py`` compiles too). Every array
is C-contiguous (the optimizer's parameters and buffers are; a gradient that is not
is copied by ``reshape``, which is harmless as it is only read), so the loop runs over
flat views. The hyper-parameters are rounded to the array's dtype once, and the loop
computes in that dtype, as torch does. No ``fastmath``: LLVM then keeps every rounding
of the reference (no fused multiply-adds), so the result equals the reference's bit
for bit.

Three entry points share that loop:

* ``_sgd_parallel`` cuts the elements into blocks of ``BLOCK`` and lets ``prange``
  share them between the threads, for large parameters (the big convolution weights);
* ``_sgd_serial`` runs the loop on the calling thread, for parameters under
  ``PARALLEL_MIN`` elements. Waking the thread pool for a parallel loop costs
  microseconds (an estimate: the order of a thread wake-up and a barrier), about the
  time one core takes to update ``PARALLEL_MIN`` elements (an estimate: 32K float32
  elements move ~640 KB, ~10 us at tens of GB/s). Most parameters are far smaller:
  in ``UNet(base_channels=16, depth=2)`` 22 of the 32 have at most 64 elements
  (batch-norm weights and biases, biases), and one has more than ``PARALLEL_MIN``;
* ``_sgd_group`` updates up to ``GROUP`` parameters in one call (``sgd_steps``, an optimizer's
  whole step), one parameter per ``prange`` iteration: one call and one wake of the threads for
  every ``GROUP`` parameters of a model (two for the U-Net above), where a call each returns to
  Python as many times and runs every small one on one core. The parameters arrive as a tuple
  of ``GROUP`` arrays (padded with empty ones), so the kernel compiles once for any model, not
  once per number of parameters.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import update

__all__ = ["sgd_step", "sgd_steps"]

# Elements per parallel block: 64 KiB of float32 per array, so a block's scheduling
# cost is small next to its pass over memory and a 10^6-element weight still gives
# the threads dozens of blocks to share.
BLOCK = 1 << 14
# Parameters smaller than this are updated serially (see the module docstring).
PARALLEL_MIN = 1 << 15
# _sgd_group: parameters per call (a tuple's length is part of its type: one length, one compilation),
# and the size from which a parameter gets a call of its own, whose blocks all the threads share (in a
# group, a parameter is one thread's; a U-Net's largest, 36,864 elements, is well under it).
# LLVM's time to compile the group grows much faster than the tuples' length (measured on the 2-core
# development machine, one dtype, a cold cache: 8 arrays 1.7 s, 16 2.5 s, 24 5.2 s, 32 15.7 s), and
# each more call costs microseconds in a step of milliseconds: 16 per call.
GROUP = 16
GROUP_MAX = 1 << 18


# The element update of update.py, inlined into the loop (a call per element would cost more than the update).
_update_element = njit(cache=True, inline="always")(update.update_element)
_rounded = njit(cache=True, inline="always")(update.rounded)


@njit(cache=True)
def _update_range(p, g, b, start, stop, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """update.py's update of elements [start, stop), computed in p's dtype; b is used only when momentum != 0;
    ``lr`` is a one-element array, read here (``sgd_steps``)."""
    lr_t, mu_t, undamped_t, wd_t = _rounded(p, lr[0], momentum, dampening, weight_decay)
    decay, has_momentum = weight_decay != 0, momentum != 0
    for e in range(start, stop):
        _update_element(p, g, b, e, lr_t, mu_t, undamped_t, wd_t, decay, has_momentum, nesterov, first_step)


@njit(cache=True)
def _sgd_serial(p, g, b, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """Every element on the calling thread (small parameters)."""
    _update_range(p, g, b, 0, p.size, lr, momentum, dampening, weight_decay, nesterov, first_step)


@njit(parallel=True, cache=True)
def _sgd_parallel(p, g, b, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """Blocks of BLOCK elements shared between the threads (large parameters)."""
    n = p.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        _update_range(p, g, b, k * BLOCK, min((k + 1) * BLOCK, n), lr, momentum, dampening, weight_decay, nesterov, first_step)


@njit(parallel=True, cache=True)
def _sgd_group(ps, gs, bs, count, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """The first ``count`` parameters of the tuples ps, gs, bs (flat arrays, each under GROUP_MAX
    elements), one parameter per ``prange`` iteration."""
    for k in prange(count):
        _update_range(ps[k], gs[k], bs[k], 0, ps[k].size, lr, momentum, dampening, weight_decay, nesterov, first_step)


def sgd_steps(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """``sgd_step`` of every parameter (see the reference): up to ``GROUP`` per compiled call
    (``_sgd_group``); one of ``GROUP_MAX`` elements or more, of another dtype than the first's, or not
    C-contiguous, on its own (``sgd_step``)."""
    if not params:
        return
    lr = _rate_array(lr)
    dtype = params[0].dtype
    flat = []
    for p, g, b in zip(params, grads, momentum_buffers):
        # the tuples hold one array type: C-contiguous, writeable, of the first parameter's dtype
        if (p.size >= GROUP_MAX or p.dtype != dtype or g.dtype != dtype or not p.flags.c_contiguous
                or not (b is None or b.flags.c_contiguous)):
            sgd_step(p, g, b, lr, momentum, dampening, weight_decay, nesterov, first_step)
            continue
        g = g.ravel()  # a view where g is C-contiguous, else a copy (g is only read)
        if not (g.flags.c_contiguous and g.flags.writeable):
            g = g.copy()
        flat.append((p.ravel(), g, g if b is None else b.ravel()))  # views: p and b are C-contiguous
    empty = np.empty(0, dtype)
    for start in range(0, len(flat), GROUP):
        group = flat[start : start + GROUP]
        pad = (empty,) * (GROUP - len(group))
        ps, gs, bs = (tuple(a[i] for a in group) + pad for i in range(3))
        _sgd_group(ps, gs, bs, len(group), lr, momentum, dampening, weight_decay, nesterov, first_step)


def sgd_step(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """One SGD step of ``param`` (and ``momentum_buffer``) in place, one pass; returns None.

    ``param`` and ``momentum_buffer`` must be C-contiguous (``reshape(-1)`` is then a
    view, so the writes land in them); without a buffer (``momentum`` == 0) the kernel
    gets the gradient in its place, which it then neither reads as a buffer nor writes.
    """
    p = param.reshape(-1)
    g = grad.reshape(-1)
    b = g if momentum_buffer is None else momentum_buffer.reshape(-1)
    kernel = _sgd_parallel if p.size >= PARALLEL_MIN else _sgd_serial
    kernel(p, g, b, _rate_array(lr), momentum, dampening, weight_decay, nesterov, first_step)


def _rate_array(lr):
    """The kernels read the rate from a one-element float64 array when they run: the optimizer's own
    (``minseg.optim.SGD`` passes it, so a replayed step sees a changed rate: ``minseg/capture.py``), or one
    made here for a float."""
    return lr if isinstance(lr, np.ndarray) and lr.dtype == np.float64 and lr.shape == (1,) else np.full(1, update.learning_rate(lr))
