"""minseg's random generator: one seeded NumPy Generator for parameter initialisation and dropout.

``minseg.manual_seed(s)`` makes model construction and dropout masks reproducible, as
``torch.manual_seed`` does for torch (the streams differ: minseg cannot draw torch's numbers).
"""
from __future__ import annotations

import numpy as np

_rng = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Seed minseg's random generator (dropout masks, parameter initialisation)."""
    global _rng
    _rng = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    """The generator every random draw of minseg uses."""
    return _rng


__all__ = ["manual_seed", "generator"]
