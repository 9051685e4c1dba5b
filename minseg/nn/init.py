"""Parameter initialisation, with torch's defaults.

torch's conv layers draw ``weight ~ kaiming_uniform(a=sqrt(5))``: Kaiming
(He) initialisation gives ``std = gain / sqrt(fan_in)`` with the leaky-ReLU
gain ``sqrt(2 / (1 + a^2))``; a uniform distribution U(-b, b) has std
``b / sqrt(3)``, so ``b = sqrt(3) * gain / sqrt(fan_in)``, which for a = sqrt(5)
is exactly ``1 / sqrt(fan_in)``. The bias is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

``fan_in = weight.shape[1] * kh * kw`` for both conv and transposed conv:
torch computes it from the weight tensor's dim 1, which is ``C_in/groups``
for Conv2d but ``C_out/groups`` for ConvTranspose2d (weight (C_in, C_out/groups, kh, kw)).
"""
from __future__ import annotations

import math

import numpy as np

from ..rng import generator


def fan_in(shape) -> int:
    return int(shape[1] * np.prod(shape[2:], dtype=np.int64))


def kaiming_uniform(shape, a: float = math.sqrt(5), dtype=np.float32) -> np.ndarray:
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in(shape))
    return generator().uniform(-bound, bound, size=shape).astype(dtype)


def uniform_bias(n: int, weight_shape, dtype=np.float32) -> np.ndarray:
    bound = 1.0 / math.sqrt(fan_in(weight_shape))
    return generator().uniform(-bound, bound, size=n).astype(dtype)
