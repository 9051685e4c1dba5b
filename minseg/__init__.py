"""minseg: a from-scratch NumPy/Numba deep-learning engine for semantic segmentation.

Start reading at ``minseg/tensor.py`` (Tensor and backward), then
``minseg/functional.py`` (the ops), then ``kernels/<op>/reference.py`` (the math).
"""
from . import functional
from .autograd import Function, GradcheckError, enable_grad, gradcheck, is_grad_enabled, no_grad
from .backend import available_backends, get_backend, set_backend
from .rng import manual_seed
from .metrics import masks_to_boxes
from .tensor import Tensor, tensor

__version__ = "0.1.0"

__all__ = [
    "Tensor",
    "tensor",
    "Function",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "gradcheck",
    "GradcheckError",
    "functional",
    "set_backend",
    "get_backend",
    "available_backends",
    "manual_seed",
    "masks_to_boxes",
]
