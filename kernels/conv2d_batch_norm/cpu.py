"""conv2d_batch_norm on the CPU: the convolution's kernels and the batch norm's in one compiled call each way.

``conv2d_forward`` and ``batch_norm_training`` each prepare their arrays in Python, then make
one Numba call. Here both preparations run first (``conv2d.cpu.forward_kernel_call``,
``batch_norm.cpu.training_kernel_call``: the batch norm's input is the convolution's output
array, not yet filled), then ``_conv_then_batch_norm`` runs the two kernels back to back: no
return to Python between them, when the convolution has just filled the caches with its data
and Python would run slowest. The backward likewise prepares the batch norm's backward, the
conv's grad_input and grad_weight (``backward_kernel_call``, ``grad_input_kernel_call``,
``grad_weight_kernel_call``) and runs the three kernels in one call (``_batch_norm_then_conv``).
The kernels and their arguments are the ones the separate calls use, so the results are the
same, bit for bit. Where a conv function's default is not one compiled call (strides other than
1: im2col with BLAS; grad_weight where v6 does not apply), the separate calls run.

The layers functions (a double conv) go one step further: every layer's preparation runs first
-- each layer's input is the output array the layer before will fill -- then one compiled call
runs two layers' kernels (``_two_layers_forward``, ``_two_layers_backward``), so a double conv
returns to Python once each way instead of twice. Where a layer cannot be prepared (its conv
has no one-call path), the layers run one by one.
"""
from __future__ import annotations

from numba import njit

from kernels.batch_norm import cpu as batch_norm
from kernels.batch_norm.cpu import _backward_by_channel, _backward_by_plane, _training_kernel
from kernels.conv2d import cpu as conv2d
from kernels.conv2d.cpu import _forward_vector_kernel, _grad_weight_outer_kernel
from kernels.conv2d_batch_norm.reference import layers_backward, layers_training

__all__ = ["conv2d_batch_norm_training", "conv2d_batch_norm_backward", "conv2d_batch_norm_layers_training",
           "conv2d_batch_norm_layers_backward"]


@njit(cache=True)  # the two kernels it calls run their own parallel loops
def _conv_then_batch_norm(conv_args, batch_norm_args):
    _forward_vector_kernel(*conv_args)
    _training_kernel(*batch_norm_args)


def _forward_call(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu):
    """((y, xhat, invstd), the arguments of ``_conv_then_batch_norm``) of one layer, or None where its conv
    has no one-call path (not v5's stride-1 kernel). x need only have its shape yet."""
    call = conv2d.forward_kernel_call(x, w, b, stride, padding, dilation, groups)
    if call is None:
        return None
    z, conv_args = call
    outputs, batch_norm_args = batch_norm.training_kernel_call(z, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)
    return outputs, (conv_args, batch_norm_args)


def conv2d_batch_norm_training(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                               relu=False):
    """(y, xhat, invstd) of the batch norm (training mode) of ``conv2d_forward(x, w, b, ...)``; see the reference."""
    call = _forward_call(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)
    if call is None:  # the two calls
        z = conv2d.conv2d_forward(x, w, b, stride, padding, dilation, groups)
        return batch_norm.batch_norm_training(z, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu)
    outputs, args = call
    _conv_then_batch_norm(*args)
    return outputs


@njit(cache=True)  # each kernel runs its own parallel loop
def _batch_norm_then_conv(batch_norm_args, by_channel, grad_input_args, grad_weight_args):
    """The batch norm's backward (it fills gz), then the conv's grad_input (if its arguments are given)
    and grad_weight of gz; returns grad_weight's (C_out, Cg*kh*kw) result."""
    if by_channel:
        _backward_by_channel(*batch_norm_args)
    else:
        _backward_by_plane(*batch_norm_args)
    if grad_input_args is not None:
        _forward_vector_kernel(*grad_input_args)
    return _grad_weight_outer_kernel(*grad_weight_args)


def _backward_call(gy, x, w, xhat, invstd, bn_weight, stride, padding, dilation, groups, training, relu_output, needs):
    """(the arguments of ``_batch_norm_then_conv``, gx, gz, gbn_weight, gbn_bias) of one layer, or None where
    its backward is not one compiled call: grad_weight not wanted or not at v6, or grad_input wanted and
    not v5's stride-1 path. gy need only have its shape yet."""
    if not needs[1]:
        return None
    (gz, gbn_weight, gbn_bias), by_channel, bn_args = batch_norm.backward_kernel_call(gy, xhat, invstd, bn_weight, training, relu_output)
    gw_args = conv2d.grad_weight_kernel_call(x, gz, w.shape, stride, padding, dilation, groups)
    gi_call = conv2d.grad_input_kernel_call(gz, w, x.shape, stride, padding, dilation, groups) if needs[0] and gw_args else None
    if gw_args is None or (needs[0] and gi_call is None):
        return None
    gx, gi_args = gi_call if gi_call is not None else (None, None)
    return (bn_args, by_channel, gi_args, gw_args), gx, gz, gbn_weight, gbn_bias


def conv2d_batch_norm_backward(gy, x, w, xhat, invstd, bn_weight, stride, padding, dilation, groups, training, relu_output, needs):
    """(gx, gw, gb, gbn_weight, gbn_bias); see the reference. One compiled call when grad_weight is wanted
    and its default (v6) applies, and grad_input, if wanted, is v5's stride-1 path; else the separate calls."""
    call = _backward_call(gy, x, w, xhat, invstd, bn_weight, stride, padding, dilation, groups, training, relu_output, needs)
    if call is None:  # the separate calls
        gz, gbn_weight, gbn_bias = batch_norm.batch_norm_backward(gy, xhat, invstd, bn_weight, training, relu_output)
        gx = conv2d.conv2d_grad_input(gz, w, x.shape, stride, padding, dilation, groups) if needs[0] else None
        gw = conv2d.conv2d_grad_weight(x, gz, w.shape, stride, padding, dilation, groups) if needs[1] else None
    else:
        args, gx, gz, gbn_weight, gbn_bias = call
        gw = _batch_norm_then_conv(*args).reshape(w.shape)
    gb = conv2d.conv2d_grad_bias(gz) if needs[2] else None
    return gx, gw, gb, gbn_weight, gbn_bias


@njit(cache=True)
def _two_layers_forward(first, second):
    """Two layers' ``_conv_then_batch_norm``, the first's output the second's input."""
    _conv_then_batch_norm(*first)
    _conv_then_batch_norm(*second)


@njit(cache=True)
def _two_layers_backward(last, before):
    """Two layers' ``_batch_norm_then_conv``, the last layer first (its grad_input fills the gy of the
    layer before); returns their grad_weight results in that order."""
    return _batch_norm_then_conv(*last), _batch_norm_then_conv(*before)


def conv2d_batch_norm_layers_training(x, layers):
    """[(y, xhat, invstd) of each layer]; see the reference. Every layer prepared first, then one
    compiled call per two layers; the layers one by one where a layer has no one-call path."""
    outputs, calls = [], []
    for layer in layers:
        call = _forward_call(x, *layer)
        if call is None:  # nothing has run yet: run the layers one by one instead
            return layers_training(conv2d_batch_norm_training, x, layers)
        outputs.append(call[0])
        calls.append(call[1])
        x = call[0][0]  # filled by this layer's call, just before the next layer's
    for k in range(0, len(calls) - 1, 2):
        _two_layers_forward(calls[k], calls[k + 1])
    if len(calls) % 2:
        _conv_then_batch_norm(*calls[-1])
    return outputs


def conv2d_batch_norm_layers_backward(gy, layers, needs):
    """[(gx, gw, gb, gbn_weight, gbn_bias) of each layer]; see the reference. Every layer prepared first (the
    last first: its gx is the gy of the layer before), then one compiled call per two layers; the layers
    one by one where a layer's backward has no one-call path."""
    calls, gy_k = [None] * len(layers), gy
    for k in range(len(layers) - 1, -1, -1):
        calls[k] = _backward_call(gy_k, *layers[k], needs[k])
        if calls[k] is None:  # nothing has run yet: run the layers one by one instead, from gy
            return layers_backward(conv2d_batch_norm_backward, gy, layers, needs)
        gy_k = calls[k][1]  # layer k's gx: the gy of layer k - 1, filled in the same compiled call
    gws = [None] * len(layers)
    k = len(layers) - 1
    while k >= 1:
        gws[k], gws[k - 1] = _two_layers_backward(calls[k][0], calls[k - 1][0])
        k -= 2
    if k == 0:
        gws[0] = _batch_norm_then_conv(*calls[0][0])
    grads = []
    for (_, gx, gz, gbn_weight, gbn_bias), gw, layer, need in zip(calls, gws, layers, needs):
        gb = conv2d.conv2d_grad_bias(gz) if need[2] else None
        grads.append((gx, gw.reshape(layer[1].shape), gb, gbn_weight, gbn_bias))
    return grads
