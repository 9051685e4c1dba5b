"""Segmentation models: UNet and a small FCN. Both map (N, C_in, H, W) images to
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
    """

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
            y = getattr(self, f"up{i}")(y)
            y = getattr(self, f"dec{i}")(F.cat([skips.pop(), y], dim=1))
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


MODELS = {"unet": UNet, "fcn": FCN}


def build_model(name: str, **config) -> Module:
    """A model by name ('unet' or 'fcn') from its constructor arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**config)
