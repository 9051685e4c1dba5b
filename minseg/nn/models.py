"""Segmentation models: UNet, a small FCN and a small DeepLab. Each maps (N, C_in, H, W) images to
(N, num_classes, H, W) logits, the segmentation map (softmax over dim 1 gives
per-pixel class probabilities).

Inputs whose H or W is not a multiple of the network's total stride
``2**depth`` are zero-padded at the bottom/right before the encoder and the
logits are cropped back, so any size works and the output always matches the input.
"""
from __future__ import annotations

from .. import functional as F
from ..tensor import Tensor
from .layers import BatchNorm2d, Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Sequential, Upsample
from .module import Module

UPSAMPLING = ("bilinear", "transpose")


def double_conv(c_in: int, c_out: int) -> Sequential:
    """(conv3x3 -> BatchNorm -> ReLU) twice; the convs have no bias (BatchNorm's shift replaces it)."""
    return Sequential(
        Conv2d(c_in, c_out, 3, padding=1, bias=False),
        BatchNorm2d(c_out),
        ReLU(),
        Conv2d(c_out, c_out, 3, padding=1, bias=False),
        BatchNorm2d(c_out),
        ReLU(),
    )


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad H and W at the bottom/right up to a multiple of ``multiple`` (differentiable, via cat)."""
    n, c, h, w = x.shape
    ph, pw = -h % multiple, -w % multiple
    if pw:
        x = F.cat([x, Tensor(x.xp.zeros((n, c, h, pw), x.dtype))], dim=3)
    if ph:
        x = F.cat([x, Tensor(x.xp.zeros((n, c, ph, w + pw), x.dtype))], dim=2)
    return x


def _check_input(x, in_channels):
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != in_channels:
        shape = x.shape if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a Tensor of shape (N, {in_channels}, H, W), got {shape}")


class UNet(Module):
    """U-Net (Ronneberger et al. 2015), small: ``depth`` down- and up-sampling stages.

    Encoder stage i (i = 0..depth) has ``base_channels * 2**i`` channels; each
    decoder stage upsamples by 2 (``'bilinear'`` interpolation, or a learned
    2x2 stride-2 ``'transpose'`` convolution that also halves the channels),
    concatenates the encoder's feature map of the same size (the skip), and
    applies a double conv. A 1x1 conv gives the class logits.

    With bilinear upsampling the resize and the join run as one op (``F.interpolate_cat``: the
    resized map is written straight into its channels of the decoder's input); ``fuse = False``
    runs the ``Upsample`` module and ``F.cat`` instead (the same numbers; for a subclass of
    Upsample, which may compute something else, they always run).
    """

    fuse = True

    def __init__(self, in_channels=3, num_classes=4, base_channels=16, depth=3, upsampling="bilinear"):
        super().__init__()
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
        if depth < 1 or base_channels < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError("in_channels, num_classes, base_channels and depth must all be >= 1")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels, depth=depth, upsampling=upsampling)
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = double_conv(in_channels, widths[0])
        self.pool = MaxPool2d(2)
        for i in range(1, depth + 1):
            setattr(self, f"down{i}", double_conv(widths[i - 1], widths[i]))
        for i in range(depth, 0, -1):  # up{i} brings stage i back to stage i-1
            if upsampling == "transpose":
                up = ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2)
                merged = 2 * widths[i - 1]
            else:
                up = Upsample(scale_factor=2, mode="bilinear", align_corners=False)
                merged = widths[i] + widths[i - 1]
            setattr(self, f"up{i}", up)
            setattr(self, f"dec{i}", double_conv(merged, widths[i - 1]))
        self.head = Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        _check_input(x, self.in_channels)
        h, w = x.shape[2:]
        x = _pad_to_multiple(x, 2**self.depth)
        skips = [self.inc(x)]
        for i in range(1, self.depth + 1):
            skips.append(getattr(self, f"down{i}")(self.pool(skips[-1])))
        y = skips.pop()
        for i in range(self.depth, 0, -1):
            up = getattr(self, f"up{i}")
            if type(up) is Upsample and self.fuse:  # the resize written straight into the joined map (one node)
                y = F.interpolate_cat(skips.pop(), y, up.size, up.scale_factor, up.mode, up.align_corners)
            else:
                y = F.cat([skips.pop(), up(y)], dim=1)
            y = getattr(self, f"dec{i}")(y)
        y = self.head(y)
        return y if y.shape[2:] == (h, w) else y[:, :, :h, :w]


class FCN(Module):
    """A fully convolutional network (Long et al. 2015), small: an encoder of
    ``depth`` (double conv, max-pool) stages, a 1x1 conv classifier on the
    coarse features, and bilinear upsampling of the logits back to the input size.
    """

    def __init__(self, in_channels=3, num_classes=4, base_channels=16, depth=3):
        super().__init__()
        if depth < 1 or base_channels < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError("in_channels, num_classes, base_channels and depth must all be >= 1")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels, depth=depth)
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        layers, c = [], in_channels
        for i in range(depth):
            layers += [double_conv(c, base_channels * 2**i), MaxPool2d(2)]
            c = base_channels * 2**i
        self.encoder = Sequential(*layers)
        self.classifier = Conv2d(c, num_classes, 1)

    def forward(self, x):
        _check_input(x, self.in_channels)
        h, w = x.shape[2:]
        x = _pad_to_multiple(x, 2**self.depth)
        y = self.classifier(self.encoder(x))
        y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        return y if y.shape[2:] == (h, w) else y[:, :, :h, :w]


def conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1) -> Sequential:
    """conv (no bias, 'same'-size padding for odd kernels) -> BatchNorm -> ReLU."""
    padding = dilation * (kernel_size - 1) // 2
    return Sequential(
        Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False),
        BatchNorm2d(c_out),
        ReLU(),
    )


class ResidualBlock(Module):
    """A ResNet basic block: relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)).

    The first conv strides by ``stride``; both dilate by ``dilation``. The
    shortcut is the identity, or a strided 1x1 conv + BatchNorm when the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.body = Sequential(
            conv_bn_relu(c_in, c_out, 3, stride=stride, dilation=dilation),
            Conv2d(c_out, c_out, 3, padding=dilation, dilation=dilation, bias=False),
            BatchNorm2d(c_out),
        )
        self.projects = stride != 1 or c_in != c_out
        if self.projects:
            self.shortcut = Sequential(Conv2d(c_in, c_out, 1, stride=stride, bias=False), BatchNorm2d(c_out))

    def forward(self, x):
        skip = self.shortcut(x) if self.projects else x
        return F.relu(self.body(x) + skip)


class ASPP(Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017, DeepLabv3).

    Parallel branches see the same features at several context sizes: a 1x1
    conv, one 3x3 conv per atrous ``rate``, and image-level pooling (the mean
    over H and W, i.e. ``adaptive_avg_pool2d(x, 1)``, then a 1x1 conv, broadcast
    back over the map). The branches are concatenated and fused by a 1x1 conv.
    The pooling branch has a bias and no BatchNorm: its map is 1x1, so a batch
    of one image would give BatchNorm a single value per channel.
    """

    def __init__(self, c_in: int, c_out: int, rates=(2, 4, 6)):
        super().__init__()
        self.rates = tuple(rates)
        self.branch0 = conv_bn_relu(c_in, c_out, 1)
        for i, rate in enumerate(self.rates, 1):
            setattr(self, f"branch{i}", conv_bn_relu(c_in, c_out, 3, dilation=rate))
        self.image_pool = Conv2d(c_in, c_out, 1)
        self.project = conv_bn_relu((len(self.rates) + 2) * c_out, c_out, 1)

    def forward(self, x):
        branches = [getattr(self, f"branch{i}")(x) for i in range(len(self.rates) + 1)]
        pooled = F.relu(self.image_pool(x.mean(dim=(2, 3), keepdim=True)))
        branches.append(F.interpolate(pooled, size=x.shape[2:], mode="nearest"))  # a constant map per channel
        return self.project(F.cat(branches, dim=1))


class DeepLab(Module):
    """A small DeepLabv3+-style network (Chen et al. 2018): a residual encoder of output
    stride ``2**depth``, dilated instead of strided after that, an ASPP head, and a
    decoder that merges the head with stride-4 encoder features before bilinear
    upsampling to the input size.

    Encoder: a stride-2 stem of width ``base_channels``, then ``depth - 1``
    stride-2 residual blocks doubling the width (output stride ``2**depth``, 8
    by default), then two residual blocks that keep the resolution and grow the
    receptive field with dilation 2 and 4 instead (where a classification
    ResNet would stride to 16 and 32). ASPP rates default to (2, 4, 6): on the
    8x8 feature map of a 64x64 tile the 3x3 taps at rate 6 reach across the
    whole map, while DeepLab's (6, 12, 18) would read mostly padding there.
    """

    def __init__(self, in_channels=3, num_classes=4, base_channels=16, depth=3, rates=(2, 4, 6)):
        super().__init__()
        if depth < 2 or base_channels < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f"DeepLab needs depth >= 2 (output stride 2**depth >= 4) and positive sizes, got depth={depth}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels, depth=depth, rates=tuple(rates))
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        widths = [base_channels * 2**i for i in range(depth)]
        self.stem = Sequential(conv_bn_relu(in_channels, widths[0], 3, stride=2), conv_bn_relu(widths[0], widths[0], 3))
        for i in range(1, depth):  # stage i: output stride 2**(i+1)
            setattr(self, f"stage{i}", ResidualBlock(widths[i - 1], widths[i], stride=2))
        self.dilated = Sequential(ResidualBlock(widths[-1], widths[-1], dilation=2), ResidualBlock(widths[-1], widths[-1], dilation=4))
        head = 2 * base_channels
        self.aspp = ASPP(widths[-1], head, rates)
        low = widths[1 if depth > 2 else 0]  # the stride-4 features (the stem's stride 2 when depth == 2)
        self.reduce = conv_bn_relu(low, base_channels, 1)
        self.decoder = conv_bn_relu(head + base_channels, head, 3)
        self.classifier = Conv2d(head, num_classes, 1)

    def forward(self, x):
        _check_input(x, self.in_channels)
        h, w = x.shape[2:]
        x = _pad_to_multiple(x, 2**self.depth)
        y = self.stem(x)
        low = y
        for i in range(1, self.depth):
            y = getattr(self, f"stage{i}")(y)
            if i == 1 and self.depth > 2:
                low = y
        y = self.aspp(self.dilated(y))
        y = F.interpolate(y, size=low.shape[2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.decoder(F.cat([y, self.reduce(low)], dim=1)))
        y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        return y if y.shape[2:] == (h, w) else y[:, :, :h, :w]


MODELS = {"unet": UNet, "fcn": FCN, "deeplab": DeepLab}


def build_model(name: str, **config) -> Module:
    """A model by name ('unet', 'fcn' or 'deeplab') from its constructor arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**config)
