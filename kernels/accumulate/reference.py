"""The sum of two partial gradients, into the first: the NumPy definition.

When the backward walk (``Tensor.backward`` in ``minseg/tensor.py``) reaches a node
used by several ops, the node's gradient is the sum of the gradients its users sent
back (the multivariable chain rule: dL/dx = sum over the uses u of dL/du du/dx)::

    total[i] <- total[i] + part[i]      for every element i

In U-Net these are the skip tensors' gradients (the encoder output that both the
max-pool and the decoder's concatenation read), megabytes each. A helper of the
walk, not a differentiable op: nothing flows back through it, so there is no
backward. It is a kernel so that the parallel backends sum on every core (and on
the GPU, where the gradients live) rather than in one NumPy pass on one thread.

Like ``sgd_step``, ``accumulate`` **writes its first input**: ``total`` is updated
in place and the function returns None; ``part`` is only read. Both have the same
shape and dtype (float32 or float64) and are C-contiguous.

Exactness: each element is one IEEE addition, one rounding, with nothing to fuse
(no product, so no fused multiply-add on any device) and no order to choose. Every
backend therefore equals this reference bit for bit, NaN and inf included
(inf + -inf is NaN, NaN + anything is NaN).
"""
from __future__ import annotations

__all__ = ["accumulate"]


def accumulate(total, part):
    """``total += part`` elementwise, in place; returns None.

    ``total`` and ``part`` are C-contiguous arrays of the same shape and dtype;
    ``total`` is written, ``part`` only read.
    """
    total += part
