"""The SGD update of one parameter: the NumPy definition (torch.optim.SGD's rule).

For a parameter p with gradient g, learning rate lr, momentum mu, dampening tau and
weight decay lambda, one step is::

    g <- g + lambda p                        (skipped when lambda = 0)
    b <- g                                   (first step)
    b <- mu b + (1 - tau) g                  (later steps)
    d <- g + mu b  if nesterov  else  b      (d = g when mu = 0: no buffer at all)
    p <- p - lr d

An optimizer step, not a differentiable op: nothing flows back through it, so there
is no backward. It is a kernel because it is one pass over memory: reading p, g and
b and writing p and b once per element, where the same update in NumPy calls (below)
is 2-9 calls per parameter (one per operation), each a pass over memory and most a
temporary array, every step, for every parameter of the network.

Unlike every other kernel but ``accumulate``, ``sgd_step`` **writes its inputs**: it updates ``param``
and ``momentum_buffer`` in place and returns None. It never writes ``grad`` (the
caller's ``.grad`` stays as backward left it). Arithmetic is in the parameter's
dtype, one rounding per operation in the order written above, as torch does; the
hyper-parameters are rounded to that dtype first (``1 - tau`` is computed in float64,
then rounded).
"""
from __future__ import annotations

from .update import learning_rate

__all__ = ["sgd_step", "sgd_steps"]


def sgd_step(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """One SGD step of ``param`` in place (and of ``momentum_buffer`` when ``momentum`` != 0); returns None.

    ``grad`` has ``param``'s shape and dtype and is only read. ``momentum_buffer`` is an
    array like ``param`` (C-contiguous, as ``param``), or None when ``momentum`` == 0;
    with ``first_step`` its old contents are ignored and it becomes ``g`` (so the caller
    may allocate it with ``empty_like``). ``nesterov`` needs ``momentum`` > 0. ``lr`` is a float or a
    one-element array holding it (the optimizer passes its own: ``update.learning_rate``).
    """
    t = param.dtype.type
    lr = learning_rate(lr)  # a float, or the optimizer's one-element array (update.py)
    g = grad + t(weight_decay) * param if weight_decay else grad  # a new array: grad stays as it is
    if momentum:
        if first_step:
            momentum_buffer[...] = g
        else:
            momentum_buffer *= t(momentum)
            momentum_buffer += t(1 - dampening) * g
        g = g + t(momentum) * momentum_buffer if nesterov else momentum_buffer
    param -= t(lr) * g


def each_step(step, params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """``sgd_steps`` as one ``step`` (a backend's ``sgd_step``) per parameter: the backends without a
    grouped kernel use it."""
    for p, g, b in zip(params, grads, momentum_buffers):
        step(p, g, b, lr, momentum, dampening, weight_decay, nesterov, first_step)


def sgd_steps(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """``sgd_step`` of every parameter of the sequence ``params`` (with the gradient and buffer at the same
    position of ``grads`` and ``momentum_buffers``, whose entries are None when ``momentum`` == 0), with
    the same hyper-parameters and ``first_step``: an optimizer's whole step in one call."""
    each_step(sgd_step, params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step)
