"""A convolution followed by batch normalisation in training mode, as one call.

Nothing new to derive: the op is the composition of two others, and each keeps its own math
(``kernels/conv2d/reference.py``, ``kernels/batch_norm/reference.py``)::

    z = conv2d(x, w, b)                                   (N, C_out, Ho, Wo)
    mean_c, var_c = the batch statistics of z per channel (over N, Ho, Wo)
    y = w_bn (z - mean) / sqrt(var + eps) + b_bn,  and max(y, 0) with ``relu``

with the running statistics updated in place, as ``batch_norm_training`` does. Backward is the
chain rule through the two, in reverse, with each op's own derivation::

    dL/dz, dL/dw_bn, dL/db_bn = batch_norm_backward(dL/dy, ...)
    dL/dx, dL/dw, dL/db       = conv2d_grad_input / conv2d_grad_weight / conv2d_grad_bias (dL/dz, ...)

``conv2d_batch_norm_backward`` returns all five.

``conv2d_batch_norm_layers_training`` / ``_backward`` run several such layers one after another
(a double conv), each layer's output the next one's input; backward walks them in reverse, each
layer's dL/dx being the dL/dy of the layer before::

    dL/dy_{k-1} = dL/dx_k                    (y_{k-1} = x_k)

Why a fused op at all: a training step runs this pair for every layer of a double conv. As
separate calls, Python runs between the kernels -- the end of one Function, the start of the next --
right after a kernel has filled the caches with its data, when Python is slowest. As one call, a
backend can run the kernels back to back (the cpu backend: one compiled call each way), with the
same arithmetic, so the same numbers, bit for bit. The layers functions take that one step
further: a whole double conv as one call each way.
"""
from __future__ import annotations

from kernels.batch_norm.reference import batch_norm_backward, batch_norm_training
from kernels.conv2d.reference import conv2d_forward, conv2d_grad_bias, conv2d_grad_input, conv2d_grad_weight

__all__ = ["conv2d_batch_norm_training", "conv2d_batch_norm_backward", "conv2d_batch_norm_layers_training",
           "conv2d_batch_norm_layers_backward"]


def conv2d_batch_norm_training(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                               relu=False):
    """(y, xhat, invstd) of ``batch_norm_training(conv2d_forward(x, w, b, ...), bn_weight, bn_bias, running_mean,
    running_var, momentum, eps, relu)``: the convolution's output normalised with its batch statistics, which
    also update the running ones in place (either may be None)."""
    z = conv2d_forward(x, w, b, stride, padding, dilation, groups)
    return batch_norm_training(z, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)


def conv2d_batch_norm_backward(gy, x, w, xhat, invstd, bn_weight, stride, padding, dilation, groups, training, relu_output, needs):
    """(gx, gw, gb, gbn_weight, gbn_bias): ``batch_norm_backward(gy, xhat, invstd, bn_weight, training,
    relu_output)`` gives gz (and the batch norm's two gradients, always returned), then the conv's
    gradients of gz; ``needs`` = (gx, gw, gb) wanted, None where not."""
    gz, gbn_weight, gbn_bias = batch_norm_backward(gy, xhat, invstd, bn_weight, training, relu_output)
    gx = conv2d_grad_input(gz, w, x.shape, stride, padding, dilation, groups) if needs[0] else None
    gw = conv2d_grad_weight(x, gz, w.shape, stride, padding, dilation, groups) if needs[1] else None
    gb = conv2d_grad_bias(gz) if needs[2] else None
    return gx, gw, gb, gbn_weight, gbn_bias


def layers_training(layer_training, x, layers):
    """The layers loop of ``conv2d_batch_norm_layers_training`` over a backend's one-layer call
    ``layer_training`` (every backend without a fused version of its own uses it)."""
    outputs = []
    for layer in layers:
        outputs.append(layer_training(x, *layer))
        x = outputs[-1][0]  # this layer's y is the next one's x
    return outputs


def layers_backward(layer_backward, gy, layers, needs):
    """The layers loop of ``conv2d_batch_norm_layers_backward`` over a backend's one-layer call."""
    grads = [None] * len(layers)
    for k in range(len(layers) - 1, -1, -1):
        grads[k] = layer_backward(gy, *layers[k], needs[k])
        gy = grads[k][0]  # dL/dx of layer k is dL/dy of layer k - 1
    return grads


def conv2d_batch_norm_layers_training(x, layers):
    """[(y, xhat, invstd) of each layer]: ``conv2d_batch_norm_training`` of each layer in turn, the first
    on ``x``, every later one on the y before it. ``layers``: one tuple per layer of
    ``conv2d_batch_norm_training``'s arguments after x: (w, b, stride, padding, dilation, groups,
    bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)."""
    return layers_training(conv2d_batch_norm_training, x, layers)


def conv2d_batch_norm_layers_backward(gy, layers, needs):
    """[(gx, gw, gb, gbn_weight, gbn_bias) of each layer]: ``conv2d_batch_norm_backward`` of each layer,
    the last first, on ``gy`` (dL/dy of the last layer), then each earlier one on the gx after it.
    ``layers``: one tuple per layer of ``conv2d_batch_norm_backward``'s arguments between gy and
    needs (x, w, xhat, invstd, bn_weight, stride, padding, dilation, groups, training, relu_output);
    ``needs``: (gx, gw, gb) wanted, per layer; every layer but the first must want its gx (the
    gradient that flows on) when any layer before it wants anything."""
    return layers_backward(conv2d_batch_norm_backward, gy, layers, needs)
