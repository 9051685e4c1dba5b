"""The differentiable ops of a segmentation network, with torch.nn.functional's names.

Each op is a public function that checks its arguments (clear errors naming the
argument, the expected and the actual value) and normalises them, then a
:class:`~minseg.autograd.Function` whose forward and backward call the active
backend's kernels (``kernels/<op>/``). The Functions never import a kernel
module: ``backend.current()`` picks numpy, cpu or cuda, and the backend used
by a forward is remembered for its backward.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from kernels.shapes import conv_output_size, conv_transpose_output_size, pool_output_size

from . import backend, capture
from .autograd import Chain, Function, is_grad_enabled
from .rng import generator
from .tensor import Tensor

# ----------------------------------------------------------------- argument checks


def _tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    raise TypeError(f"{name} must be a minseg Tensor, got {type(x).__name__}")


def _float_tensor(x, name: str) -> Tensor:
    x = _tensor(x, name)
    if x.data.dtype.char not in "fd":  # float32, float64 (a char test: this runs for every operand of every op)
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    return x


def _same_dtype(t: Tensor | None, dtype, name: str, ref_name: str = "input"):
    """``t`` (when given) has ``dtype``, the dtype of ``ref_name``."""
    if t is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {dtype}; they must be the same")


def _ndim(x: Tensor, ndim: int, name: str, layout: str):
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {x.shape}")


def _is_int(value) -> bool:
    """An integer (Python or NumPy): ``numbers.Integral``, with the common case first (an ABC check
    costs far more than a type test, and this runs for the arguments of every op of every step)."""
    return type(value) is int or isinstance(value, numbers.Integral)


def _is_real(value) -> bool:
    """A real number (``numbers.Real``), Python's float and int tested first (see ``_is_int``)."""
    return type(value) is float or type(value) is int or isinstance(value, numbers.Real)


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a 2-tuple."""
    if type(value) is int and value >= minimum:  # the common case, first (every conv and pool call)
        return (value, value)
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {pair}")
    return pair


def _flag(value, name: str) -> bool:
    """A bool argument: torch raises on ints and other truthy values, so do we."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def _pool_args(input, kernel_size, stride, padding, ceil_mode):
    """The checks every pooling op shares: (x, kernel_size, stride, padding, ceil_mode), stride defaulting to kernel_size."""
    x = _float_tensor(input, "input")
    _ndim(x, 4, "input", "(N, C, H, W)")
    k = _pair(kernel_size, "kernel_size", 1)
    s = k if stride is None or stride == () else _pair(stride, "stride", 1)
    p = _pair(padding, "padding", 0)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding {p} must be at most half of kernel_size {k}")
    return x, k, s, p, _flag(ceil_mode, "ceil_mode")


def _contiguous(a):
    """``a`` itself when C-contiguous (0-d arrays included), else a contiguous copy."""
    return a if a.flags.c_contiguous else backend.array_module(a).ascontiguousarray(a)


def _array(t: Tensor | None):
    return None if t is None else _contiguous(t.data)


# ------------------------------------------------------------------------- conv2d


def _conv_operands(input, weight, bias, groups, weight_layout):
    """Checked (input, weight, bias) of conv2d / conv_transpose2d: 4-D floats of one dtype, groups >= 1."""
    x = _float_tensor(input, "input")
    _ndim(x, 4, "input", "(N, C_in, H, W)")
    return (x, *_conv_weights(x.dtype, weight, bias, groups, weight_layout))


def _conv_weights(dtype, weight, bias, groups, weight_layout):
    """Checked (weight, bias) for an input of ``dtype``: 4-D floats of that dtype, groups >= 1."""
    w = _float_tensor(weight, "weight")
    _ndim(w, 4, "weight", weight_layout)
    _same_dtype(w, dtype, "weight")
    if bias is not None:
        bias = _float_tensor(bias, "bias")
        _same_dtype(bias, dtype, "bias")
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    return w, bias


class Conv2dFunction(Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        ctx.kernels = backend.current()
        ctx.save_for_backward(x, w)
        ctx.args = (stride, padding, dilation, groups)
        return ctx.kernels.conv2d_forward(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        kernels, need = ctx.kernels, ctx.needs_input_grad
        gy = _contiguous(gy)
        gx = kernels.conv2d_grad_input(gy, w, x.shape, *ctx.args) if need[0] else None
        gw = kernels.conv2d_grad_weight(x, gy, w.shape, *ctx.args) if need[1] else None
        gb = kernels.conv2d_grad_bias(gy) if need[2] else None
        return gx, gw, gb


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``.

    y[n, o, i, j] = b[o] + sum_{c in group(o), p, q} w[o, c, p, q] * x_pad[n, c, i*sh + p*dh, j*sw + q*dw]

    ``padding`` is an int, a pair, ``'valid'`` (0) or ``'same'`` (stride 1 only;
    the total ``dilation*(k-1)`` is split with the extra pixel bottom/right, as torch).
    """
    x, w, bias, kwargs, _ = _conv2d_arguments(input, weight, bias, stride, padding, dilation, groups)
    return Conv2dFunction.apply(x, w, bias, **kwargs)


def _conv2d_arguments(input, weight, bias, stride, padding, dilation, groups):
    """conv2d's checks: (x, w, bias, Conv2dFunction's keyword arguments, the output's shape)."""
    x = _float_tensor(input, "input")
    _ndim(x, 4, "input", "(N, C_in, H, W)")
    w, bias, kwargs, out_shape = _conv2d_layer(x.shape, x.dtype, weight, bias, stride, padding, dilation, groups)
    return _contig_tensor(x), w, bias, kwargs, out_shape


def _conv2d_layer(shape, dtype, weight, bias, stride, padding, dilation, groups):
    """conv2d's checks of everything but the input itself, for an input of ``shape`` (N, C_in, H, W)
    and ``dtype``: (w, bias, Conv2dFunction's keyword arguments, the output's shape)."""
    w, bias = _conv_weights(dtype, weight, bias, groups, "(C_out, C_in/groups, kH, kW)")
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    n, c_in, h, wd = shape
    c_out, c_per_group, kh, kw = w.shape
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide in_channels={c_in} and out_channels={c_out}")
    if c_per_group * groups != c_in:
        raise ValueError(
            f"weight expects {c_per_group * groups} input channels ({c_per_group} per group x groups={groups}), "
            f"but input has {c_in} channels (input shape {tuple(shape)}, weight shape {w.shape})"
        )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},) to match weight's out_channels, got {bias.shape}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0), (0, 0))
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride})")
            pads = tuple((t // 2, t - t // 2) for t in (dilation[0] * (kh - 1), dilation[1] * (kw - 1)))
        else:
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        p = _pair(padding, "padding", 0)
        pads = ((p[0], p[0]), (p[1], p[1]))
    ho = conv_output_size(h, sum(pads[0]), dilation[0], kh, stride[0])
    wo = conv_output_size(wd, sum(pads[1]), dilation[1], kw, stride[1])
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f"conv2d output size would be ({ho}, {wo}) <= 0: input {h}x{wd} with padding {pads} is smaller than "
            f"the dilated kernel {dilation[0] * (kh - 1) + 1}x{dilation[1] * (kw - 1) + 1}"
        )
    w = _contig_tensor(w)  # kernels index flat memory
    bias = None if bias is None else _contig_tensor(bias)
    kwargs = dict(stride=stride, padding=pads, dilation=dilation, groups=int(groups))
    return w, bias, kwargs, (n, c_out, ho, wo)


class ConvTranspose2dFunction(Function):
    """The adjoint of conv2d in its input: forward is conv2d's input gradient, and vice versa."""

    @staticmethod
    def forward(ctx, x, w, b, out_shape, stride, padding, dilation, groups):
        ctx.kernels = backend.current()
        ctx.save_for_backward(x, w)
        ctx.args = (stride, padding, dilation, groups)
        y = ctx.kernels.conv2d_grad_input(x, w, out_shape, *ctx.args)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        kernels, need = ctx.kernels, ctx.needs_input_grad
        gy = _contiguous(gy)
        gx = None
        if need[0]:
            # conv2d of gy has H_in + output_padding // stride rows (cols likewise): with
            # output_padding >= stride (allowed when dilation > stride) the extra ones match no pixel of x
            gx = _contiguous(kernels.conv2d_forward(gy, w, None, *ctx.args)[:, :, : x.shape[2], : x.shape[3]])
        gw = kernels.conv2d_grad_weight(gy, x, w.shape, *ctx.args) if need[1] else None
        gb = kernels.conv2d_grad_bias(gy) if need[2] else None
        return gx, gw, gb


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1) -> Tensor:
    """Transposed convolution ("deconvolution"), as ``torch.nn.functional.conv_transpose2d``.

    weight is (C_in, C_out/groups, kH, kW); the output size is
    ``(H - 1)*stride - 2*padding + dilation*(k - 1) + output_padding + 1``.
    """
    x, w, bias = _conv_operands(input, weight, bias, groups, "(C_in, C_out/groups, kH, kW)")
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    padding = _pair(padding, "padding", 0)
    output_padding = _pair(output_padding, "output_padding", 0)
    n, c_in, h, wd = x.shape
    if w.shape[0] != c_in:
        raise ValueError(f"weight has {w.shape[0]} input channels (dim 0) but input has {c_in} (input {x.shape}, weight {w.shape})")
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide in_channels={c_in}")
    c_out = w.shape[1] * groups
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {bias.shape}")
    for i in range(2):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(
                f"output_padding {output_padding} must be smaller than either stride {stride} or dilation {dilation}"
            )
    out = [
        conv_transpose_output_size(size, padding[i], dilation[i], w.shape[2 + i], stride[i], output_padding[i])
        for i, size in enumerate((h, wd))
    ]
    if min(out) <= 0:
        raise ValueError(f"conv_transpose2d output size would be {tuple(out)} <= 0 for input {x.shape} and padding {padding}")
    pads = ((padding[0], padding[0]), (padding[1], padding[1]))
    x, w = _contig_tensor(x), _contig_tensor(w)  # kernels index flat memory
    bias = None if bias is None else _contig_tensor(bias)
    return ConvTranspose2dFunction.apply(
        x, w, bias, out_shape=(n, c_out, out[0], out[1]), stride=stride, padding=pads, dilation=dilation, groups=int(groups)
    )


# -------------------------------------------------------------------- interpolate

INTERPOLATE_MODES = ("nearest", "nearest-exact", "bilinear")


class InterpolateFunction(Function):
    @staticmethod
    def forward(ctx, x, out_size, mode, align_corners, scales):
        ctx.kernels = backend.current()
        ctx.args = (x.shape, mode, align_corners, scales)
        return ctx.kernels.interpolate_forward(x, out_size, mode, align_corners, scales)

    @staticmethod
    def backward(ctx, gy):
        return (ctx.kernels.interpolate_backward(_contiguous(gy), *ctx.args),)


def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None) -> Tensor:
    """Resize (N, C, H, W) maps, as ``torch.nn.functional.interpolate``.

    Give exactly one of ``size`` (int or pair) and ``scale_factor`` (float or
    pair; the output is ``floor(in * scale_factor)`` and coordinates map with
    ``1/scale_factor``, torch's rule). ``align_corners`` is for 'bilinear' only
    (default False).
    """
    x = _float_tensor(input, "input")
    kwargs = _interpolate_arguments(x, size, scale_factor, mode, align_corners)
    return InterpolateFunction.apply(_contig_tensor(x), **kwargs)


def _interpolate_arguments(x, size, scale_factor, mode, align_corners) -> dict:
    """interpolate's checks of the float Tensor ``x`` and the rest: InterpolateFunction's keyword arguments."""
    if mode not in INTERPOLATE_MODES:
        raise ValueError(f"mode must be one of {INTERPOLATE_MODES}, got {mode!r}")
    _ndim(x, 4, "input", "(N, C, H, W)")
    if align_corners is not None and mode != "bilinear":
        raise ValueError(f"align_corners can only be set with mode='bilinear', got mode={mode!r} with align_corners={align_corners}")
    align_corners = bool(align_corners)
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of size and scale_factor")
    in_hw = x.shape[2:]
    if size is not None:
        out = _pair(size, "size", 1)
        scales = (in_hw[0] / out[0], in_hw[1] / out[1])
    else:
        sf = (scale_factor, scale_factor) if isinstance(scale_factor, numbers.Real) else tuple(scale_factor)
        if len(sf) != 2 or not all(isinstance(s, numbers.Real) and s > 0 and math.isfinite(s) for s in sf):
            raise ValueError(f"scale_factor must be a positive number or a pair of them, got {scale_factor!r}")
        out = tuple(int(math.floor(n * s)) for n, s in zip(in_hw, sf))
        if min(out) <= 0:
            raise ValueError(f"interpolate output size {out} <= 0 for input size {in_hw} and scale_factor {scale_factor}")
        scales = (1.0 / sf[0], 1.0 / sf[1])
    return dict(out_size=out, mode=mode, align_corners=align_corners, scales=scales)


class InterpolateCatFunction(Function):
    """cat([skip, interpolate(x)], dim=1) as one Function (``kernels/interpolate_cat``): the cpu backend
    writes the resize straight into its channels of the output, so the resized array never exists."""

    @staticmethod
    def forward(ctx, skip, x, out_size, mode, align_corners, scales):
        ctx.kernels = backend.current()
        ctx.args = (skip.shape[1], x.shape, mode, align_corners, scales)
        return ctx.kernels.interpolate_cat_forward(skip, x, out_size, mode, align_corners, scales)

    @staticmethod
    def backward(ctx, gy):
        return ctx.kernels.interpolate_cat_backward(_contiguous(gy), *ctx.args, ctx.needs_input_grad)


def interpolate_cat(skip, input, size=None, scale_factor=None, mode="nearest", align_corners=None) -> Tensor:
    """``cat([skip, interpolate(input, size, scale_factor, mode, align_corners)], dim=1)`` as one node of the
    graph: the same checks, values and gradients as the two calls (a U-Net decoder joins its upsampled
    map to the encoder's this way). ``skip`` (N, C_s, Ho, Wo) must have the resized map's N, Ho, Wo
    and dtype."""
    x = _float_tensor(input, "input")
    kwargs = _interpolate_arguments(x, size, scale_factor, mode, align_corners)
    s = _float_tensor(skip, "skip")
    _ndim(s, 4, "skip", "(N, C_s, Ho, Wo)")
    if s.shape[0] != x.shape[0] or s.shape[2:] != kwargs["out_size"]:
        raise ValueError(f"skip must have shape ({x.shape[0]}, C_s, {kwargs['out_size'][0]}, {kwargs['out_size'][1]}) "
                         f"to be joined with the resized input, got {s.shape}")
    _same_dtype(s, x.dtype, "skip")
    return InterpolateCatFunction.apply(_contig_tensor(s), _contig_tensor(x), **kwargs)


# ---------------------------------------------------------------------- max_pool2d


class MaxPool2dFunction(Function):
    """The forward keeps the number of each window's selected tap (uint8 for windows up to 16x16, see
    kernels/max_pool2d/taps.py), all the backward needs; torch's flat indices are made only when asked."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        kernels = backend.current()
        y, idx = kernels.max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode)
        ctx.kernels, ctx.idx, ctx.x_shape = kernels, idx, x.shape
        ctx.window = (kernel_size, stride, padding, dilation)
        return y

    @staticmethod
    def backward(ctx, gy):
        return (ctx.kernels.max_pool2d_backward(_contiguous(gy), ctx.idx, ctx.x_shape, *ctx.window),)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling, as ``torch.nn.functional.max_pool2d``; ``stride`` defaults to ``kernel_size``."""
    x, k, s, p, ceil_mode = _pool_args(input, kernel_size, stride, padding, ceil_mode)
    d = _pair(dilation, "dilation", 1)
    out = tuple(pool_output_size(x.shape[2 + i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(2))
    if min(out) <= 0:
        raise ValueError(f"max_pool2d output size would be {out} <= 0 for input size {x.shape[2:]}, kernel {k}, dilation {d}")
    for i in range(2):  # a dilation larger than the input can step a window over it entirely
        if d[i] == 1:  # not without dilation: every window starts before the input's end (pool_output_size)
            continue  # and ends at or after its first pixel (padding <= kernel_size // 2); tests/test_overhead.py
        taps = np.arange(out[i])[:, None] * s[i] - p[i] + np.arange(k[i]) * d[i]
        if not ((taps >= 0) & (taps < x.shape[2 + i])).any(axis=1).all():
            raise ValueError(
                f"max_pool2d: with dilation {d} and padding {p}, a window of kernel_size {k} reads only padding "
                f"for input size {x.shape[2:]} (torch returns an index outside the input there)"
            )
    y = MaxPool2dFunction.apply(_contig_tensor(x), kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=bool(ceil_mode))
    if return_indices:  # torch's flat int64 index into each input plane, made from the taps only here
        kernels = backend.current()
        taps = y._ctx.idx if y._ctx is not None else None
        if taps is None:  # no graph was recorded: run the kernel for the taps
            _, taps = kernels.max_pool2d_forward(_contiguous(_array(x)), k, s, p, d, bool(ceil_mode))
        return y, Tensor(kernels.max_pool2d_indices(taps, x.shape, k, s, p, d))
    return y


# ------------------------------------------------- avg_pool2d, adaptive_avg_pool2d


class AvgPool2dFunction(Function):
    """Window means (kernels/avg_pool2d/); y is linear in x, so the backward needs only the hyper-parameters."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.kernels = backend.current()
        ctx.args = (x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return ctx.kernels.avg_pool2d_forward(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, gy):
        return (ctx.kernels.avg_pool2d_backward(_contiguous(gy), *ctx.args),)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None) -> Tensor:
    """2-D average pooling, as ``torch.nn.functional.avg_pool2d``; ``stride`` defaults to ``kernel_size``.

    ``count_include_pad`` divides by the window size including zero padding;
    ``divisor_override`` (a non-zero int) replaces the divisor altogether.
    """
    x, k, s, p, ceil_mode = _pool_args(input, kernel_size, stride, padding, ceil_mode)
    count_include_pad = _flag(count_include_pad, "count_include_pad")
    if divisor_override is not None:
        if not isinstance(divisor_override, numbers.Integral) or isinstance(divisor_override, bool):
            raise TypeError(f"divisor_override must be None or an int, got {divisor_override!r} ({type(divisor_override).__name__})")
        if divisor_override == 0:
            raise ValueError("divisor_override must not be 0")
    out = tuple(pool_output_size(x.shape[2 + i], k[i], s[i], p[i], 1, ceil_mode) for i in range(2))
    if min(out) <= 0:
        raise ValueError(f"avg_pool2d output size would be {out} <= 0 for input size {x.shape[2:]}, kernel {k}, padding {p}")
    return AvgPool2dFunction.apply(
        _contig_tensor(x), kernel_size=k, stride=s, padding=p, ceil_mode=ceil_mode,
        count_include_pad=count_include_pad, divisor_override=None if divisor_override is None else int(divisor_override),
    )


class AdaptiveAvgPool2dFunction(Function):
    @staticmethod
    def forward(ctx, x, output_size):
        ctx.kernels, ctx.x_shape = backend.current(), x.shape
        return ctx.kernels.adaptive_avg_pool2d_forward(x, output_size)

    @staticmethod
    def backward(ctx, gy):
        return (ctx.kernels.adaptive_avg_pool2d_backward(_contiguous(gy), ctx.x_shape),)


def adaptive_avg_pool2d(input, output_size) -> Tensor:
    """Average pooling to a fixed (Ho, Wo), as ``torch.nn.functional.adaptive_avg_pool2d``.

    ``output_size`` is an int or a pair; a ``None`` entry keeps that input side.
    Output i averages rows ``floor(i*H/Ho)`` to ``ceil((i+1)*H/Ho) - 1`` (columns
    likewise), so any sizes work, an output larger than the input included.
    """
    x = _float_tensor(input, "input")
    _ndim(x, 4, "input", "(N, C, H, W)")
    sizes = (output_size, output_size) if output_size is None or isinstance(output_size, numbers.Integral) else output_size
    if isinstance(sizes, (tuple, list)) and len(sizes) == 2:
        sizes = tuple(x.shape[2 + a] if v is None else v for a, v in enumerate(sizes))
    out = _pair(sizes, "output_size", 1)
    return AdaptiveAvgPool2dFunction.apply(_contig_tensor(x), output_size=out)


# ------------------------------------------------------------- relu and softmaxes


class ReLUFunction(Function):
    """y = max(x, 0);  dy/dx = 1 where x > 0, else 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.kernels = backend.current()
        y = ctx.kernels.relu_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        return (ctx.kernels.relu_backward(y, _contiguous(gy)),)


def relu(input) -> Tensor:
    x = _float_tensor(input, "input")
    return ReLUFunction.apply(_contig_tensor(x))


def _contig_tensor(x: Tensor) -> Tensor:
    """x itself when contiguous; else a contiguous copy that stays in the graph."""
    if x.data.flags.c_contiguous:
        return x
    return _Contiguous.apply(x)


class _Contiguous(Function):
    """A C-contiguous copy; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x):
        return _contiguous(x)

    @staticmethod
    def backward(ctx, g):
        return (g,)


def _softmax_dim(x: Tensor, dim, name):
    if dim is None or not isinstance(dim, numbers.Integral):
        raise ValueError(f"{name}: dim must be an int, got {dim!r}")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"{name}: dim {dim} is out of range for a {x.ndim}-D input")
    return int(dim) % x.ndim


class SoftmaxFunction(Function):
    @staticmethod
    def forward(ctx, x, dim, log):
        ctx.kernels, ctx.dim, ctx.log = backend.current(), dim, log
        y = (ctx.kernels.log_softmax_forward if log else ctx.kernels.softmax_forward)(x, dim)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        fn = ctx.kernels.log_softmax_backward if ctx.log else ctx.kernels.softmax_backward
        return (fn(y, _contiguous(gy), ctx.dim),)


def softmax(input, dim) -> Tensor:
    """exp(x_i - max x) / sum_j exp(x_j - max x) along ``dim``."""
    x = _float_tensor(input, "input")
    return SoftmaxFunction.apply(_contig_tensor(x), dim=_softmax_dim(x, dim, "softmax"), log=False)


def log_softmax(input, dim) -> Tensor:
    """x_i - max x - log sum_j exp(x_j - max x) along ``dim``."""
    x = _float_tensor(input, "input")
    return SoftmaxFunction.apply(_contig_tensor(x), dim=_softmax_dim(x, dim, "log_softmax"), log=True)


# --------------------------------------------------------------------- cross_entropy

REDUCTIONS = ("none", "mean", "sum")


class CrossEntropyFunction(Function):
    """One fused forward pass writes the loss and, when the logits want a gradient, the
    gradient of the reduced loss (divided by D for 'mean'); the backward scales it by gloss.

    With gloss = 1 (``loss.backward()``) a backend may return that gradient array itself.
    It is then handed out: the caller may change it in place (``.grad += ...``), so
    this node lets go of it, and a second backward through a retained graph computes
    it again instead of reusing it."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing):
        ctx.kernels, ctx.shape = backend.current(), logits.shape
        need_grad = is_grad_enabled() and ctx.needs_input_grad[0]  # inference writes no (N, C, S) gradient
        # the kernels see (N, C, S) and (N, S): a view of the contiguous arrays (no graph node for it)
        logits = logits.reshape(logits.shape[0], logits.shape[1], -1)
        target = target.reshape(logits.shape[0], -1)
        ctx.args = (logits, target, weight, ignore_index, reduction, label_smoothing)
        loss, ctx.dlogits, _, n_invalid = ctx.kernels.cross_entropy_forward(*ctx.args, need_grad)
        if int(n_invalid):  # one number read back; the targets themselves never leave the device
            _raise_bad_target(target, logits.shape[1], ignore_index)
        capture.on_replay(lambda: int(n_invalid) and _raise_bad_target(target, logits.shape[1], ignore_index),
                          reads=(n_invalid, target))
        return loss

    @staticmethod
    def backward(ctx, gloss):
        dlogits = ctx.dlogits
        if dlogits is None:  # handed out by an earlier backward of this retained graph
            dlogits = ctx.kernels.cross_entropy_forward(*ctx.args, True)[1]
        glogits = ctx.kernels.cross_entropy_backward(dlogits, _contiguous(gloss), ctx.args[4])
        ctx.dlogits = None if glogits is dlogits else dlogits
        return glogits.reshape(ctx.shape), None, None


def _raise_bad_target(target, n_classes, ignore_index):
    """The error for a target outside [0, C) that is not ignore_index (the kernel counted it)."""
    t = backend.to_numpy(target)  # only on this error path
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    value = t[bad].reshape(-1)[0]
    raise ValueError(
        f"target value {value} is out of range: expected class indices in [0, {n_classes - 1}] or ignore_index={ignore_index}"
    )


def _class_scores(input, target, weight, weight_name: str, reduction, has_reduction: bool = True, scores: str = "scores"):
    """The checks every classification loss shares: (N, C, ...) float ``scores``, integer targets of shape
    (N, ...), a ``reduction`` (unchecked when not ``has_reduction``) and an optional per-class weight.
    Returns (x, t, weight, target shape)."""
    x = _float_tensor(input, "input")
    if x.ndim < 2:
        raise ValueError(f"input must be (N, C) or (N, C, H, W) {scores}, got shape {x.shape}")
    t = _tensor(target, "target")
    if t.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {t.dtype} (probability targets are not supported)")
    n, c = x.shape[:2]
    expected = (n,) + x.shape[2:]
    if t.shape != expected:
        raise ValueError(f"target must have shape {expected} for input of shape {x.shape}, got {t.shape}")
    if has_reduction and reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is not None:
        weight = _float_tensor(weight, weight_name)
        _same_dtype(weight, x.dtype, weight_name)
        if weight.shape != (c,):
            raise ValueError(f"{weight_name} must have shape ({c},), one per class, got {weight.shape}")
    return x, t, weight, expected


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0) -> Tensor:
    """Pixel-wise cross-entropy of logits (N, C) or (N, C, H, W) against integer class targets.

    loss_i = -(1 - eps) w[t_i] log p[i, t_i] - (eps / C) sum_c w[c] log p[i, c]
    with p = softmax over C. 'mean' divides the sum by the summed weights w[t_i]
    of the non-ignored pixels (NaN if every pixel is ignored); 'none' gives 0 at
    ignored pixels.
    """
    x, t, weight, expected = _class_scores(input, target, weight, "weight", reduction, scores="logits")
    n, c = x.shape[:2]
    if not (isinstance(label_smoothing, numbers.Real) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    # The range of the target values is checked by the kernel (on the device for cuda):
    # CrossEntropyFunction raises if it counted any value outside [0, C) that is not ignore_index.
    target_arr = _contiguous(t.data.astype(np.int64, copy=False))
    loss = CrossEntropyFunction.apply(
        _contig_tensor(x),
        Tensor(target_arr),
        weight,
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=float(label_smoothing),
    )
    return loss.reshape(expected) if reduction == "none" else loss


# ------------------------------------------------------------------------ batch_norm


class BatchNormFunction(Function):
    """y = w (x - mean) invstd + b, and with ``relu`` max(that, 0) in the same pass (batch_norm_relu).

    The fused backward masks the gradient with the output it saved (y > 0), which the
    next layer keeps alive anyway: the same memory as a separate ReLU node, one pass less.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, training, relu=False):
        ctx.kernels, ctx.training = backend.current(), training
        if training:  # the batch's statistics, which also update the running ones (one kernel call)
            y, xhat, invstd = ctx.kernels.batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, relu)
        else:
            y, xhat, invstd = ctx.kernels.batch_norm_forward(x, running_mean, running_var, weight, bias, eps, relu)
        ctx.save_for_backward(xhat, invstd, weight, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        xhat, invstd, weight, relu_output = ctx.saved_tensors
        gx, gw, gb = ctx.kernels.batch_norm_backward(_contiguous(gy), xhat, invstd, weight, ctx.training, relu_output)
        need = ctx.needs_input_grad
        return gx, gw if need[1] else None, gb if need[2] else None


class Conv2dBatchNormFunction(Function):
    """batch_norm(conv2d(x, w, b), ..., bn_weight, bn_bias) [and its ReLU] as one Function: in training,
    one kernel call for both forwards, and one for the batch norm's backward and the conv's
    gradients after it (``kernels/conv2d_batch_norm``): the same kernels, in the same order, as the
    two Functions run, without the Python between them."""

    @staticmethod
    def forward(ctx, x, w, b, bn_weight, bn_bias, stride, padding, dilation, groups, running_mean, running_var, momentum, eps,
                training, relu):
        kernels = ctx.kernels = backend.current()
        ctx.training, ctx.args = training, (stride, padding, dilation, groups)
        if training:
            y, xhat, invstd = kernels.conv2d_batch_norm_training(x, w, b, stride, padding, dilation, groups, bn_weight, bn_bias,
                                                                 running_mean, running_var, momentum, eps, relu)
        else:
            z = kernels.conv2d_forward(x, w, b, stride, padding, dilation, groups)
            y, xhat, invstd = kernels.batch_norm_forward(z, running_mean, running_var, bn_weight, bn_bias, eps, relu)
        ctx.save_for_backward(x, w, xhat, invstd, bn_weight, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, xhat, invstd, bn_weight, relu_output = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw, gb, g_bn_weight, g_bn_bias = ctx.kernels.conv2d_batch_norm_backward(
            _contiguous(gy), x, w, xhat, invstd, bn_weight, *ctx.args, ctx.training, relu_output, need[:3])
        return gx, gw, gb, g_bn_weight if need[3] else None, g_bn_bias if need[4] else None


class Conv2dBatchNormLayersFunction(Function):
    """Conv2dBatchNormFunction's layers one after another in training (a double conv), as one Function:
    one kernel call each way for all of them (``kernels/conv2d_batch_norm``'s layers functions), the
    same kernels in the same order as the layers' own calls, so the same numbers. Its inputs are x,
    then (w, b, bn_weight, bn_bias) per layer; ``layers`` holds the rest of each layer's arguments.

    Backward hands each layer's dL/dx to the layer before as its dL/dy (the chain rule along the
    path, as ``autograd.Chain`` does), and starts at the first layer that wants a gradient: the
    layers before it (frozen, under an input that wants none) are left out."""

    @staticmethod
    def forward(ctx, x, *params, layers):
        ctx.kernels = backend.current()
        calls = []  # conv2d_batch_norm_training's arguments after x, per layer
        for k, (stride, padding, dilation, groups, running_mean, running_var, momentum, eps, relu) in enumerate(layers):
            w, b, bn_weight, bn_bias = params[4 * k : 4 * k + 4]
            calls.append((w, b, stride, padding, dilation, groups, bn_weight, bn_bias, running_mean, running_var, momentum, eps, relu))
        saved = []  # conv2d_batch_norm_backward's arguments between gy and needs, per layer
        for (w, _, stride, padding, dilation, groups, bn_weight, *_, relu), (y, xhat, invstd) in zip(
                calls, ctx.kernels.conv2d_batch_norm_layers_training(x, calls)):
            saved.append((x, w, xhat, invstd, bn_weight, stride, padding, dilation, groups, True, y if relu else None))
            x = y  # this layer's output is the next one's input
        ctx.save_for_backward(*saved)
        return x

    @staticmethod
    def backward(ctx, gy):
        layers, need = ctx.saved_tensors, ctx.needs_input_grad
        conv_needs, first, upstream = [], None, need[0]
        for k in range(len(layers)):
            own = need[1 + 4 * k : 5 + 4 * k]  # w, b, bn_weight, bn_bias
            conv_needs.append((upstream, own[0], own[1]))
            if first is None and (upstream or any(own)):
                first = k
            upstream = upstream or any(own)
        grads = [None] * (1 + 4 * len(layers))
        if first is None:
            return tuple(grads)
        per_layer = ctx.kernels.conv2d_batch_norm_layers_backward(_contiguous(gy), layers[first:], conv_needs[first:])
        for k, (gx, gw, gb, g_bn_weight, g_bn_bias) in enumerate(per_layer, first):
            if k == 0:
                grads[0] = gx
            grads[1 + 4 * k : 5 + 4 * k] = gw, gb, g_bn_weight, g_bn_bias
        return tuple(g if wanted else None for g, wanted in zip(grads, need))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5) -> Tensor:
    """Batch normalisation over (N, H, W) per channel, as ``torch.nn.functional.batch_norm``.

    training: normalise with the batch mean and biased variance, and update the
    running statistics in place: r = (1 - momentum) r + momentum * stat, with
    the *unbiased* variance n/(n-1) var for ``running_var`` (as torch).
    eval: normalise with the running statistics.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu=False)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5) -> Tensor:
    """``relu(batch_norm(...))`` in one pass each way: the same arguments, outputs, gradients and
    running-statistic updates as the two calls (torch has no functional twin; its fused
    module is ``torch.ao.nn.intrinsic.BNReLU2d``). The ReLU's gradient is 0 where the
    batch norm's output is <= 0, as torch's relu (0 at exactly 0).
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu=True)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu) -> Tensor:
    """batch_norm's checks; ``relu`` fuses the ReLU after it."""
    x = _float_tensor(input, "input")
    kwargs = _batch_norm_arguments(x.shape, x.dtype, running_mean, running_var, weight, bias, training, momentum, eps, relu)
    return BatchNormFunction.apply(_contig_tensor(x), weight, bias, **kwargs)


def _batch_norm_arguments(shape, dtype, running_mean, running_var, weight, bias, training, momentum, eps, relu) -> dict:
    """The checks of batch_norm for an input of ``shape`` and ``dtype``: BatchNormFunction's keyword arguments."""
    op = "batch_norm_relu" if relu else "batch_norm"
    if len(shape) < 2:
        raise ValueError(f"input must be (N, C, ...) with at least 2 dims, got shape {shape}")
    c = shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        # one test for the common case (every layer of every step), the checks that name the problem otherwise
        if t is not None and not (isinstance(t, Tensor) and t.data.dtype == dtype and t.data.shape == (c,)):
            _float_tensor(t, name)
            _same_dtype(t, dtype, name)
            raise ValueError(f"{name} must have shape ({c},) for input with {c} channels, got {t.shape}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{op} in eval mode (training=False) needs running_mean and running_var")
    if not (_is_real(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not (_is_real(momentum) and 0 <= momentum <= 1):
        raise ValueError(f"momentum must be a number in [0, 1] (the cumulative average, momentum=None, is not supported), got {momentum!r}")
    if training and math.prod(shape) // c <= 1:
        raise ValueError(f"{op} in training mode needs more than 1 value per channel, got input shape {tuple(shape)}")
    return dict(
        # the running statistics are updated in place in training (their own arrays), read in eval
        running_mean=None if running_mean is None else running_mean.data if training else _contiguous(running_mean.data),
        running_var=None if running_var is None else running_var.data if training else _contiguous(running_var.data),
        momentum=float(momentum),
        eps=float(eps),
        training=bool(training),
        relu=relu,
    )


def conv2d_batch_norm(
    input, weight, bias, stride, padding, dilation, groups,
    running_mean, running_var, bn_weight=None, bn_bias=None, training=False, momentum=0.1, eps=1e-5, relu=False,
) -> Tensor:
    """``batch_norm(conv2d(input, weight, bias, ...), running_mean, ..., bn_weight, bn_bias, ...)``, and its
    ReLU with ``relu=True``, recorded as one node of the graph (``autograd.Chain``).

    The same arguments, checks, outputs, gradients and running-statistic updates as the calls one
    after the other (the same Functions run, in the same order); the graph holds one node per
    layer instead of two (torch's fused module is ``torch.ao.nn.intrinsic.ConvBnReLU2d``).
    """
    layer = (weight, bias, stride, padding, dilation, groups, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, relu)
    return conv2d_batch_norm_layers(input, [layer])


def conv2d_batch_norm_layers(input, layers) -> Tensor:
    """Several ``conv2d_batch_norm`` layers one after another, as one node of the graph.

    ``layers``: one tuple per layer of ``conv2d_batch_norm``'s arguments after ``input``, in order
    (weight, bias, stride, padding, dilation, groups, running_mean, running_var, bn_weight, bn_bias,
    training, momentum, eps, relu). Each layer's arguments are checked against the shape its input
    will have. In training, one ``Conv2dBatchNormLayersFunction`` runs them all (one kernel call each
    way for the whole run); else one ``autograd.Chain`` runs a ``Conv2dBatchNormFunction`` per layer.
    ``nn.Sequential`` runs a run of Conv2d, BatchNorm2d[, ReLU] modules (a double conv) through it:
    between two kernels of the block there is then no module call, no checks and no graph node, and
    in training (on the cpu backend) no Python at all.
    """
    x = _float_tensor(input, "input")
    _ndim(x, 4, "input", "(N, C_in, H, W)")
    shape, dtype = x.shape, x.dtype
    tensors, checked = [_contig_tensor(x)], []
    for weight, bias, stride, padding, dilation, groups, rm, rv, bn_weight, bn_bias, training, momentum, eps, relu in layers:
        w, b, conv_kwargs, shape = _conv2d_layer(shape, dtype, weight, bias, stride, padding, dilation, groups)
        bn_kwargs = _batch_norm_arguments(shape, dtype, rm, rv, bn_weight, bn_bias, training, momentum, eps, relu)
        checked.append((conv_kwargs, bn_kwargs))
        tensors += [w, b, bn_weight, bn_bias]
    if all(bn["training"] for _, bn in checked):  # every layer's kernels in one call each way
        args = [(c["stride"], c["padding"], c["dilation"], c["groups"], bn["running_mean"], bn["running_var"], bn["momentum"],
                 bn["eps"], bn["relu"]) for c, bn in checked]
        return Conv2dBatchNormLayersFunction.apply(*tensors, layers=args)
    # the first layer takes the input too; every later one takes the previous output first
    steps = [(Conv2dBatchNormFunction, 4 + (k == 0), {**c, **bn}) for k, (c, bn) in enumerate(checked)]
    return Chain.apply(*tensors, steps=steps)


# ------------------------------------------------------------ compositions: cat, dropout


class CatFunction(Function):
    """y = [x_1, x_2, ...] joined along ``dim``; the gradient is split back into the pieces (kernels/cat/)."""

    @staticmethod
    def forward(ctx, *arrays, dim):
        ctx.kernels, ctx.dim = backend.current(), dim
        ctx.sizes = tuple(a.shape[dim] for a in arrays)
        return ctx.kernels.cat_forward(arrays, dim)

    @staticmethod
    def backward(ctx, g):
        return ctx.kernels.cat_backward(_contiguous(g), ctx.sizes, ctx.dim, ctx.needs_input_grad)


def cat(tensors, dim=0) -> Tensor:
    """Concatenate tensors of equal shape except along ``dim``."""
    tensors = [_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    if not tensors:
        raise ValueError("cat: tensors must be a non-empty sequence")
    first = tensors[0]
    if not -first.ndim <= dim < first.ndim:
        raise ValueError(f"cat: dim {dim} is out of range for {first.ndim}-D tensors")
    dim %= first.ndim
    for i, t in enumerate(tensors[1:], 1):
        if t.ndim != first.ndim or any(a != b for j, (a, b) in enumerate(zip(t.shape, first.shape)) if j != dim):
            raise ValueError(f"cat: tensors[{i}] has shape {t.shape}, expected {first.shape} except along dim {dim}")
        if t.dtype != first.dtype:
            raise TypeError(f"cat: tensors[{i}] has dtype {t.dtype}, expected {first.dtype}")
    return CatFunction.apply(*(_contig_tensor(t) for t in tensors), dim=dim)


def dropout(input, p=0.5, training=True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (identity in eval).

    y = x * m with m = bernoulli(1-p) / (1-p);  dy/dx = m.
    """
    x = _float_tensor(input, "input")
    if not (isinstance(p, numbers.Real) and 0.0 <= p <= 1.0):
        raise ValueError(f"dropout probability p must be in [0, 1], got {p!r}")
    if not training or p == 0:
        return x
    keep = generator().random(x.shape) >= p
    mask = keep.astype(x.dtype) / (1.0 - p) if p < 1 else np.zeros(x.shape, x.dtype)
    return x * Tensor(backend.to_backend_array(mask.astype(x.dtype)))


# ============================================================================
# Losses beyond cross_entropy: nll_loss, dice_loss, focal_loss
# (cross_entropy above is log_softmax fused with nll_loss; these three share
# _class_target_operands for their argument checks.)
# ============================================================================


def _class_target_operands(input, target, weight, weight_name: str, reduction: str | None, ignore_index):
    """Checked (x, target, weight, target shape) of a loss on (N, C) or (N, C, d1, ...) scores and integer targets.

    ``target`` comes back as an (N, S) int64 array (S = d1*d2*..., 1 for
    (N, C)) whose values are class ids in [0, C) or ``ignore_index``; the
    target shape is the shape of a 'none' loss.
    """
    x, t, weight, expected = _class_scores(input, target, weight, weight_name, reduction, has_reduction=reduction is not None)
    n, c = x.shape[:2]
    if not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    t_np = t.numpy()
    if t_np.size and (t_np.min() < 0 or t_np.max() >= c):  # the masked scan only when needed
        bad = (t_np != ignore_index) & ((t_np < 0) | (t_np >= c))
        if bad.any():
            raise ValueError(
                f"target value {t_np[bad].reshape(-1)[0]} is out of range: expected class indices in [0, {c - 1}] "
                f"or ignore_index={ignore_index}"
            )
    return x, _contiguous(t.data.reshape(n, -1).astype(np.int64, copy=False)), weight, expected


def _pixel_weights(xp, target, weight, ignore_index: int, c: int, dtype):
    """(safe targets, w_t): targets with ignored pixels set to class 0 (so they index safely),
    and each pixel's weight w[t_i] (1 without weights), exactly 0 on ignored pixels."""
    valid = target != ignore_index
    t = xp.where(valid, target, 0)
    w_t = (xp.ones(c, dtype) if weight is None else weight)[t]
    return t, xp.where(valid, w_t, 0).astype(dtype)


def _reduce(xp, loss, w_t, reduction: str):
    """'none': the per-pixel map; 'sum': its sum; 'mean': sum / sum_i w_t[i] (0/0 = NaN when all are ignored, as torch)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return loss.sum() / w_t.sum()


def _pixel_scale(xp, gloss, w_t, reduction: str):
    """w_t[i] times d(reduced loss)/d(loss_i) times the upstream gradient, per pixel (N, S).

    Exactly 0 on ignored pixels (w_t = 0), even when every pixel is ignored and
    'mean' divides by 0 (as torch: the loss is NaN, its gradient 0).
    """
    if reduction == "none":
        upstream = gloss
    elif reduction == "sum":
        upstream = xp.broadcast_to(gloss, w_t.shape)
    else:
        denom = w_t.sum()
        upstream = xp.broadcast_to(gloss / (denom if denom != 0 else 1), w_t.shape)
    return upstream * w_t


def _one_hot(xp, t, c: int, dtype):
    """(N, C, S) one-hot of (N, S) class ids."""
    return (xp.arange(c)[None, :, None] == t[:, None, :]).astype(dtype)


class NLLLossFunction(Function):
    """loss_i = -w[t_i] x[i, t_i] (0 where t_i is ignored), then reduced.

    Backward: dloss_i/dx[i, c] = -w[t_i] [c == t_i]: the gradient is the
    negated one-hot of the target, weighted, times the upstream gradient of
    pixel i (gloss_i, gloss, or gloss / sum_i w[t_i] for 'mean').
    """

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, reduction):
        xp = backend.array_module(x)
        t, w_t = _pixel_weights(xp, target, weight, ignore_index, x.shape[1], x.dtype)
        ctx.t, ctx.w_t, ctx.reduction, ctx.shape = t, w_t, reduction, x.shape
        loss = -w_t * xp.take_along_axis(x, t[:, None, :], axis=1)[:, 0, :]
        return _reduce(xp, loss, w_t, reduction).astype(x.dtype)

    @staticmethod
    def backward(ctx, gloss):
        xp = backend.array_module(ctx.w_t)
        scale = _pixel_scale(xp, gloss, ctx.w_t, ctx.reduction)
        return -_one_hot(xp, ctx.t, ctx.shape[1], ctx.w_t.dtype) * scale[:, None, :], None, None


def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean") -> Tensor:
    """Negative log-likelihood of log-probabilities (N, C) or (N, C, d1, ...), as ``torch.nn.functional.nll_loss``.

    loss_i = -w[t_i] input[i, t_i], and 0 where t_i == ignore_index.
    'mean' divides the sum by sum_{i not ignored} w[t_i] (NaN if every pixel is
    ignored, as torch); 'none' returns the (N, d1, ...) map. With
    ``input = log_softmax(logits, 1)`` this is ``cross_entropy(logits, target)``.
    """
    x, t, weight, expected = _class_target_operands(input, target, weight, "weight", reduction, ignore_index)
    n, c = x.shape[:2]
    loss = NLLLossFunction.apply(
        _contig_tensor(x.reshape(n, c, -1)), Tensor(t), weight, ignore_index=int(ignore_index), reduction=reduction
    )
    return loss.reshape(expected) if reduction == "none" else loss


def dice_loss(input, target, weight=None, ignore_index=-100, smooth=1.0, include_background=True) -> Tensor:
    """Soft multi-class Dice loss of logits (N, C, d1, ...) against integer targets.

    With p = softmax(input, 1), y the one-hot target and v_i = [t_i != ignore_index],
    summed over every pixel i of the batch::

        I_c = sum_i v_i p_ic y_ic          (soft intersection)
        U_c = sum_i v_i (p_ic + y_ic)      (soft sizes of prediction and truth)
        dice_c = (2 I_c + s) / (U_c + s),  s = ``smooth``
        loss = 1 - sum_c w_c dice_c / sum_c w_c

    over the classes c taken into account: all, or all but class 0 (the
    background) when ``include_background`` is False; ``weight`` gives w_c
    (all 1 when None). The sums run over the whole batch (one Dice per class,
    not per image), so a class missing from one image does not score that image
    0 or 1 outright. A perfect prediction gives I_c = |class c|, U_c = 2 I_c and
    dice_c = 1 for every class (loss 0 up to the softmax never reaching exactly
    one-hot); ``smooth`` keeps a class absent from both prediction and truth at
    dice_c = 1 instead of 0/0, and makes an absent class whose predicted mass is
    P_c score s / (P_c + s).

    Gradient (autograd composes it from softmax, products and sums; written out
    for the reader)::

        d dice_c / d p_ic = v_i (2 y_ic (U_c + s) - (2 I_c + s)) / (U_c + s)^2
        d loss / d p_ic   = -(w_c / sum_k w_k) d dice_c / d p_ic    (0 for excluded c)
        d loss / d z_ik   = p_ik (g_ik - sum_c g_ic p_ic),   g = d loss / d p  (softmax backward)

    so raising p_ic helps where y_ic = 1 (the numerator grows twice as fast as
    the denominator) and hurts elsewhere; rare classes weigh as much as common
    ones because each dice_c is normalised by its own size U_c.
    """
    x, t, weight, _ = _class_target_operands(input, target, weight, "weight", None, ignore_index)
    n, c = x.shape[:2]
    if c < 2 and not include_background:
        raise ValueError(f"include_background=False leaves no class to score: input has {c} class(es)")
    if not (isinstance(smooth, numbers.Real) and smooth >= 0 and math.isfinite(smooth)):
        raise ValueError(f"smooth must be a finite number >= 0, got {smooth!r}")
    xp = x.xp
    valid = (t != ignore_index).astype(x.dtype)[:, None, :]  # (N, 1, S)
    truth = _one_hot(xp, xp.where(t != ignore_index, t, 0), c, x.dtype) * valid
    p = softmax(x.reshape(n, c, -1), 1) * Tensor(valid)
    intersection = (p * Tensor(truth)).sum(dim=(0, 2))
    union = p.sum(dim=(0, 2)) + Tensor(truth.sum(axis=(0, 2)))
    dice = (intersection * 2.0 + smooth) / (union + smooth)
    w = xp.ones(c, x.dtype) if weight is None else weight.data.copy()
    if not include_background:
        w[0] = 0
    if not w.sum() > 0:
        raise ValueError(f"the class weights of the scored classes sum to {float(w.sum())}; at least one must be > 0")
    return 1.0 - (dice * Tensor(w / w.sum())).sum()


class FocalLossFunction(Function):
    """Focal loss of logits (N, C, S); forward and backward in one place for numerical care.

    With l = log p_t (the log-softmax at the target class), p = exp(l),
    q = 1 - p = -expm1(l) (exact for p near 1) and alpha_t = alpha[t]::

        FL = -alpha_t q^gamma l

    Backward: dl/dz_c = delta_ct - p_c and dq/dz_c = -p (delta_ct - p_c), so

        dFL/dz_c = alpha_t (p_c - delta_ct) (q^gamma - gamma p q^(gamma-1) l)
                 = alpha_t (p_c - delta_ct) q^gamma (1 - gamma p l / q)

    The second form stays finite as p -> 1 (q -> 0): l / q -> -1 there, and it
    is set to -1 where q == 0 exactly. With gamma = 0 the factor is 1 and this
    is the cross-entropy gradient alpha_t (p_c - delta_ct).
    """

    @staticmethod
    def forward(ctx, logits, target, alpha, gamma, ignore_index, reduction):
        kernels = backend.current()
        xp = backend.array_module(logits)
        logp = kernels.log_softmax_forward(logits, 1)
        t, a_t = _pixel_weights(xp, target, alpha, ignore_index, logits.shape[1], logits.dtype)
        l_t = xp.take_along_axis(logp, t[:, None, :], axis=1)[:, 0, :]
        q = xp.maximum(-xp.expm1(l_t), 0)  # 1 - p, exact near p = 1; never -0 from rounding
        modulation = q**gamma
        ctx.saved = (logp, t, a_t, l_t, q, modulation)
        ctx.gamma, ctx.reduction = gamma, reduction
        return _reduce(xp, -a_t * modulation * l_t, a_t, reduction).astype(logits.dtype)

    @staticmethod
    def backward(ctx, gloss):
        logp, t, a_t, l_t, q, modulation = ctx.saved
        xp = backend.array_module(logp)
        with np.errstate(invalid="ignore", divide="ignore"):
            l_over_q = xp.where(q > 0, l_t / xp.where(q > 0, q, 1), -1)
        factor = modulation * (1 - ctx.gamma * xp.exp(l_t) * l_over_q) * _pixel_scale(xp, gloss, a_t, ctx.reduction)
        g = (xp.exp(logp) - _one_hot(xp, t, logp.shape[1], logp.dtype)) * factor[:, None, :]
        return g.astype(logp.dtype), None, None


def focal_loss(input, target, alpha=None, gamma=2.0, ignore_index=-100, reduction="mean") -> Tensor:
    """Multi-class focal loss (Lin et al. 2017) of logits (N, C) or (N, C, d1, ...).

    loss_i = -alpha[t_i] (1 - p_i)^gamma log p_i,  p_i = softmax(input)[i, t_i],

    and 0 where t_i == ignore_index. The factor (1 - p_i)^gamma shrinks the loss
    of pixels that are already right (p_i near 1), so the many easy background
    pixels stop drowning the few hard ones of a rare class; ``alpha`` (C,)
    weighs the classes. ``alpha`` plays the part of cross_entropy's ``weight``,
    'mean' included (the sum over pixels divided by sum_{i not ignored}
    alpha[t_i]), so gamma = 0 gives exactly ``cross_entropy(input, target,
    weight=alpha)``. The gradient is derived in :class:`FocalLossFunction`.
    """
    x, t, alpha, expected = _class_target_operands(input, target, alpha, "alpha", reduction, ignore_index)
    if not (isinstance(gamma, numbers.Real) and gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    n, c = x.shape[:2]
    loss = FocalLossFunction.apply(
        _contig_tensor(x.reshape(n, c, -1)),
        Tensor(t),
        alpha,
        gamma=float(gamma),
        ignore_index=int(ignore_index),
        reduction=reduction,
    )
    return loss.reshape(expected) if reduction == "none" else loss


# ======================================================================= end of losses


__all__ = [
    "conv2d",
    "conv_transpose2d",
    "interpolate",
    "interpolate_cat",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "relu",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "nll_loss",
    "dice_loss",
    "focal_loss",
    "batch_norm",
    "batch_norm_relu",
    "conv2d_batch_norm",
    "conv2d_batch_norm_layers",
    "cat",
    "dropout",
]
