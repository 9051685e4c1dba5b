"""conv2d_batch_norm on the GPU: the two ops' kernels launched one after the other.

On a GPU the launches are asynchronous: Python queues the batch norm's kernels while the
convolution's still run, so the host code between them is hidden behind GPU work whenever the
GPU is the slower side; one call here keeps the interface (see ``reference.py``).
"""
from __future__ import annotations

from kernels.batch_norm.cuda import batch_norm_backward, batch_norm_training
from kernels.conv2d.cuda import conv2d_forward, conv2d_grad_bias, conv2d_grad_input, conv2d_grad_weight
from kernels.conv2d_batch_norm.reference import layers_backward, layers_training

__all__ = ["conv2d_batch_norm_training", "conv2d_batch_norm_backward", "conv2d_batch_norm_layers_training",
           "conv2d_batch_norm_layers_backward"]

PTX_SIGNATURES: list = []  # no kernels of its own


def conv2d_batch_norm_training(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                               relu=False):
    """(y, xhat, invstd): ``conv2d_forward`` then ``batch_norm_training`` (see the reference)."""
    z = conv2d_forward(x, w, b, stride, padding, dilation, groups)
    return batch_norm_training(z, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)


def conv2d_batch_norm_backward(gy, x, w, xhat, invstd, bn_weight, stride, padding, dilation, groups, training, relu_output, needs):
    """(gx, gw, gb, gbn_weight, gbn_bias): ``batch_norm_backward``, then the conv's gradients (see the reference)."""
    gz, gbn_weight, gbn_bias = batch_norm_backward(gy, xhat, invstd, bn_weight, training, relu_output)
    gx = conv2d_grad_input(gz, w, x.shape, stride, padding, dilation, groups) if needs[0] else None
    gw = conv2d_grad_weight(x, gz, w.shape, stride, padding, dilation, groups) if needs[1] else None
    gb = conv2d_grad_bias(gz) if needs[2] else None
    return gx, gw, gb, gbn_weight, gbn_bias


def conv2d_batch_norm_layers_training(x, layers):
    """[(y, xhat, invstd) of each layer]: the layers one after another (see the reference)."""
    return layers_training(conv2d_batch_norm_training, x, layers)


def conv2d_batch_norm_layers_backward(gy, layers, needs):
    """[(gx, gw, gb, gbn_weight, gbn_bias) of each layer], the last layer first (see the reference)."""
    return layers_backward(conv2d_batch_norm_backward, gy, layers, needs)
