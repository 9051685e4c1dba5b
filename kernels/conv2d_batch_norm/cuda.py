"""conv2d_batch_norm on the GPU: the two ops' kernels launched one after the other.

On a GPU the launches are asynchronous: Python queues the batch norm's kernels while the
convolution's still run, so the host code between them is hidden behind GPU work whenever the
GPU is the slower side; one call here keeps the interface (see ``reference.py``).
"""
from __future__ import annotations

from kernels.batch_norm.cuda import batch_norm_training
from kernels.conv2d.cuda import conv2d_forward

__all__ = ["conv2d_batch_norm_training"]

PTX_SIGNATURES: list = []  # no kernels of its own


def conv2d_batch_norm_training(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                               relu=False):
    """(y, xhat, invstd): ``conv2d_forward`` then ``batch_norm_training`` (see the reference)."""
    z = conv2d_forward(x, w, b, stride, padding, dilation, groups)
    return batch_norm_training(z, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)
