"""minseg: a from-scratch NumPy/Numba deep-learning engine for semantic segmentation.

Start with the tour, ``python -m minseg.tour`` (or ``minseg tour``): eight checked steps
from a Tensor to the CUDA kernels, each naming the file to read next. README.md's
"Start here" gives the reading order file by file: ``minseg/tensor.py`` (Tensor and
backward), ``minseg/autograd.py`` (Function), ``minseg/functional.py`` (the ops),
``minseg/backend.py`` (which kernels run), then ``kernels/<op>/reference.py`` (the math),
``cpu.py`` and ``cuda.py``.
"""
from . import functional
from .autograd import Function, GradcheckError, enable_grad, gradcheck, is_grad_enabled, no_grad
from .backend import available_backends, get_backend, set_backend
from .metrics import masks_to_boxes
from .rng import manual_seed
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
