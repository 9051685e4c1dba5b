"""Neural-network building blocks (torch.nn's names and defaults) and segmentation models."""
from .layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    MaxPool2d,
    ReLU,
    Sequential,
    Upsample,
)
from .models import ASPP, FCN, MODELS, DeepLab, ResidualBlock, UNet, build_model, double_conv
from .module import Module, Parameter

__all__ = [
    "Module",
    "Parameter",
    "Conv2d",
    "ConvTranspose2d",
    "BatchNorm2d",
    "ReLU",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "Upsample",
    "Dropout",
    "Sequential",
    "UNet",
    "FCN",
    "DeepLab",
    "ASPP",
    "ResidualBlock",
    "MODELS",
    "build_model",
    "double_conv",
]
