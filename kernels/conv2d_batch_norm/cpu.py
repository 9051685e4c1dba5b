"""conv2d_batch_norm on the CPU: the convolution's kernel and the batch norm's in one compiled call.

``conv2d_forward`` and ``batch_norm_training`` each prepare their arrays in Python, then make
one Numba call. Here both preparations run first (``conv2d.cpu.forward_kernel_call``,
``batch_norm.cpu.training_kernel_call``: the batch norm's input is the convolution's output
array, not yet filled), then ``_conv_then_batch_norm`` runs the two kernels back to back: no
return to Python between them, when the convolution has just filled the caches with its data
and Python would run slowest. The kernels and their arguments are the ones the two calls use,
so the results are the same, bit for bit. Where the convolution's default is not one compiled
call (strides other than 1: im2col with BLAS), the two calls run one after the other.
"""
from __future__ import annotations

from numba import njit

from kernels.batch_norm import cpu as batch_norm
from kernels.batch_norm.cpu import _training_kernel
from kernels.conv2d import cpu as conv2d
from kernels.conv2d.cpu import _forward_vector_kernel

__all__ = ["conv2d_batch_norm_training"]


@njit(cache=True)  # the two kernels it calls run their own parallel loops
def _conv_then_batch_norm(conv_args, batch_norm_args):
    _forward_vector_kernel(*conv_args)
    _training_kernel(*batch_norm_args)


def conv2d_batch_norm_training(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                               relu=False):
    """(y, xhat, invstd) of the batch norm (training mode) of ``conv2d_forward(x, w, b, ...)``; see the reference."""
    call = conv2d.forward_kernel_call(x, w, b, stride, padding, dilation, groups)
    if call is None:
        z = conv2d.conv2d_forward(x, w, b, stride, padding, dilation, groups)
        return batch_norm.batch_norm_training(z, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)
    z, conv_args = call
    outputs, batch_norm_args = batch_norm.training_kernel_call(z, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)
    _conv_then_batch_norm(conv_args, batch_norm_args)
    return outputs
