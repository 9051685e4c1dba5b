"""Layers: thin Modules over minseg.functional, with torch's constructor arguments and defaults."""
from __future__ import annotations

import numpy as np

from .. import capture
from .. import functional as F
from .init import kaiming_uniform, uniform_bias
from .module import Module, Parameter


class _ConvNd(Module):
    def __init__(self, weight_shape, out_channels, bias, stride, padding, dilation, groups):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = Parameter(kaiming_uniform(weight_shape))
        self.bias = Parameter(uniform_bias(out_channels, weight_shape)) if bias else None

    def extra_repr(self):
        k = tuple(self.weight.shape[2:])
        return f"{self.in_channels}, {self.out_channels}, kernel_size={k}, stride={self.stride}, padding={self.padding}"


class Conv2d(_ConvNd):
    """y = conv2d(x, weight, bias); weight (C_out, C_in/groups, kh, kw)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self_shape = (out_channels, in_channels // groups, *F._pair(kernel_size, "kernel_size", 1))
        super().__init__(self_shape, out_channels, bias, stride, padding, dilation, groups)
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _layer_with(self, bn, relu):
        """This conv, ``bn`` (counting its batch) and the ReLU flag: one layer of ``F.conv2d_batch_norm_layers``."""
        return (self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, *bn._step_arguments(), relu)


class ConvTranspose2d(_ConvNd):
    """The adjoint of a convolution (learned upsampling); weight (C_in, C_out/groups, kh, kw)."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1, bias=True, dilation=1
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        shape = (in_channels, out_channels // groups, *F._pair(kernel_size, "kernel_size", 1))
        super().__init__(shape, out_channels, bias, stride, padding, dilation, groups)
        self.in_channels, self.out_channels, self.output_padding = in_channels, out_channels, output_padding

    def forward(self, x):
        return F.conv_transpose2d(
            x, self.weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )


class BatchNorm2d(Module):
    """Per-channel batch normalisation with learned scale/shift and running statistics.

    Training normalises with the batch statistics and updates the running ones
    (``momentum`` weights the new batch); eval uses the running statistics.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, np.float32)) if affine else None
        self.bias = Parameter(np.zeros(num_features, np.float32)) if affine else None
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, np.float32))
            self.register_buffer("running_var", np.ones(num_features, np.float32))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))

    def forward(self, x):
        return self._normalise(x, F.batch_norm)

    def forward_relu(self, x):
        """relu(self(x)) in one pass (``F.batch_norm_relu``): what Sequential runs for BatchNorm2d, ReLU."""
        return self._normalise(x, F.batch_norm_relu)

    def _normalise(self, x, function):
        return function(x, *self._step_arguments())

    def _step_arguments(self):
        """(running_mean, running_var, weight, bias, training, momentum, eps) of this call; counts the batch."""
        use_batch = self.training or not self.track_running_stats
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        if self.training and self.track_running_stats:
            self._count_batch()
            capture.on_replay(self._count_batch)  # a replayed step counts too (minseg/capture.py)
        return (*running, self.weight, self.bias, use_batch, self.momentum, self.eps)

    def _count_batch(self):
        self.num_batches_tracked.data += 1

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride or self.kernel_size}"


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad, self.divisor_override = ceil_mode, count_include_pad, divisor_override

    def forward(self, x):
        return F.avg_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad, self.divisor_override
        )

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride or self.kernel_size}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size (None keeps an input side)."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


class Upsample(Module):
    """Resize by ``scale_factor`` or to ``size`` ('nearest' by default, as torch)."""

    def __init__(self, size=None, scale_factor=None, mode="nearest", align_corners=None):
        super().__init__()
        self.size, self.scale_factor, self.mode, self.align_corners = size, scale_factor, mode, align_corners

    def forward(self, x):
        return F.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners)

    def extra_repr(self):
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}" if self.size is None else f"size={self.size}, mode={self.mode!r}"


class Dropout(Module):
    """Zero activations with probability p while training (scaled by 1/(1-p)); identity in eval."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class Sequential(Module):
    """Modules applied in order; children are named '0', '1', ...

    A BatchNorm2d directly followed by a ReLU runs as one fused call,
    ``BatchNorm2d.forward_relu`` (``F.batch_norm_relu``): the same outputs and
    running statistics as the two modules one after the other, and the same
    gradients up to the order of float additions, with one pass over the
    activations fewer each way. Conv2d, BatchNorm2d[, ReLU] layers in a row (a
    double conv) run as one node of the graph (``F.conv2d_batch_norm_layers``):
    the same kernels in the same order, so the same numbers, with the module calls,
    checks and graph bookkeeping between the kernels left out. Only these exact classes fuse (a
    subclass such as SyncBatchNorm2d may compute something else), and the modules
    and their state_dict names stay as they are. ``fuse = False`` (the constructor
    argument or the attribute) runs every module on its own.
    """

    def __init__(self, *modules, fuse=True):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        self.fuse = fuse

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        modules = list(self._modules.values())
        kinds = [type(m) for m in modules] + [None, None]  # exact classes only (see the docstring)
        i = 0
        while i < len(modules):
            m = modules[i]
            if self.fuse and kinds[i] is Conv2d and kinds[i + 1] is BatchNorm2d:
                layers = []  # every Conv2d, BatchNorm2d[, ReLU] in a row: one graph node
                while kinds[i] is Conv2d and kinds[i + 1] is BatchNorm2d:
                    relu = kinds[i + 2] is ReLU
                    layers.append(modules[i]._layer_with(modules[i + 1], relu))
                    i += 3 if relu else 2
                x = F.conv2d_batch_norm_layers(x, layers)
            elif self.fuse and kinds[i] is BatchNorm2d and kinds[i + 1] is ReLU:
                x = m.forward_relu(x)
                i += 2
            else:
                x = m(x)
                i += 1
        return x
