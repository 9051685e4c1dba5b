"""The SGD update of one element, written once and compiled by both kernel modules.

``cpu.py`` compiles these plain Python functions with ``njit`` (inlined into its
loop) and ``cuda.py`` with ``cuda.jit(device=True)`` (called by each GPU thread), so
the two backends run the same lines. The math is ``reference.py``'s.
"""
from __future__ import annotations


def learning_rate(lr) -> float:
    """``lr`` given as a float or as a one-element array holding it, as a float (host code only).

    The optimizer passes its rate in an array it owns (``minseg.optim.SGD``): a kernel that reads
    it when it runs sees the rate of now, also in a replayed step (``minseg/capture.py``), where
    a float would stay the recorded one. ``cpu.py``'s kernels read the array themselves."""
    return float(lr[0]) if hasattr(lr, "shape") else float(lr)


def rounded(p, lr, momentum, dampening, weight_decay):
    """The hyper-parameters rounded to p's dtype, once per launch: (lr, mu, 1 - tau, lambda).

    ``1 - tau`` is formed in float64 first, as the reference forms it.
    """
    t = p.dtype.type
    return t(lr), t(momentum), t(1.0 - dampening), t(weight_decay)


def update_element(p, g, b, e, lr, mu, undamped, wd, decay, has_momentum, nesterov, first_step):
    """p[e] <- p[e] - lr d, and b[e] <- the new buffer when ``has_momentum`` (b is not touched otherwise).

    The scalars come from ``rounded``; ``decay`` and ``has_momentum`` say whether lambda
    and mu are non-zero as given (the reference decides on those values too). One
    rounding per operation, in the reference's order::

        d = g + lambda p ;  m = d (first step) or mu b + (1 - tau) d ;
        d = d + mu m (nesterov) or m ;  p = p - lr d
    """
    d = g[e]
    if decay:
        d = d + wd * p[e]
    if has_momentum:
        m = d if first_step else mu * b[e] + undamped * d
        b[e] = m
        d = d + mu * m if nesterov else m
    p[e] = p[e] - lr * d
