"""A convolution followed by batch normalisation in training mode, as one call.

Nothing new to derive: the op is the composition of two others, and each keeps its own math
(``kernels/conv2d/reference.py``, ``kernels/batch_norm/reference.py``)::

    z = conv2d(x, w, b)                                   (N, C_out, Ho, Wo)
    mean_c, var_c = the batch statistics of z per channel (over N, Ho, Wo)
    y = w_bn (z - mean) / sqrt(var + eps) + b_bn,  and max(y, 0) with ``relu``

with the running statistics updated in place, as ``batch_norm_training`` does. Backward is the
chain rule through the two, in reverse: ``batch_norm_backward`` gives dL/dz from dL/dy, then
conv2d's ``conv2d_grad_input`` / ``conv2d_grad_weight`` / ``conv2d_grad_bias`` take dL/dz. So no
backward function lives here; ``minseg.functional`` calls those.

Why a fused op at all: a training step runs this pair for every layer of a double conv. As two
calls, Python runs between the two kernels -- the end of one Function, the start of the next --
right after the convolution has filled the caches with its data, when Python is slowest. As one
call, a backend can run both kernels back to back (the cpu backend: one compiled call), with the
same arithmetic, so the same numbers, bit for bit.
"""
from __future__ import annotations

from kernels.batch_norm.reference import batch_norm_training
from kernels.conv2d.reference import conv2d_forward

__all__ = ["conv2d_batch_norm_training"]


def conv2d_batch_norm_training(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                               relu=False):
    """(y, xhat, invstd) of ``batch_norm_training(conv2d_forward(x, w, b, ...), bn_weight, bn_bias, running_mean,
    running_var, momentum, eps, relu)``: the convolution's output normalised with its batch statistics, which
    also update the running ones in place (either may be None)."""
    z = conv2d_forward(x, w, b, stride, padding, dilation, groups)
    return batch_norm_training(z, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)
