"""Random flips and crops applied to an image and its mask together.

A transform is a callable ``t(image, mask, rng) -> (image, mask)`` on arrays
``image`` (C, H, W) and ``mask`` (H, W). The random generator is passed in
(the DataLoader derives one per sample from its seed, epoch and index), so an
augmented epoch can be replayed exactly. Geometry is applied identically to
both arrays; masks are never interpolated (only flipped, cropped, padded or
resized with nearest-neighbour), so every mask value stays a class id or 255.
"""
from __future__ import annotations

import numpy as np

from .dataset import IGNORE_INDEX


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, mask, rng):
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask


class RandomFlip:
    """Flip left-right with probability ``horizontal`` and up-down with probability ``vertical``."""

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.5):
        self.horizontal, self.vertical = horizontal, vertical

    def __call__(self, image, mask, rng):
        if rng.random() < self.horizontal:
            image, mask = image[:, :, ::-1], mask[:, ::-1]
        if rng.random() < self.vertical:
            image, mask = image[:, ::-1, :], mask[::-1, :]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


class RandomCrop:
    """A random ``size`` x ``size`` window (or (h, w)).

    An image smaller than the window is first padded at the bottom/right with
    0 (image) and 255 = ignore (mask), so padding never counts in the loss.
    """

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, image, mask, rng):
        image, mask = pad_to(image, mask, self.size)
        h, w = mask.shape
        top = int(rng.integers(0, h - self.size[0] + 1))
        left = int(rng.integers(0, w - self.size[1] + 1))
        window = (slice(top, top + self.size[0]), slice(left, left + self.size[1]))
        return np.ascontiguousarray(image[(slice(None),) + window]), np.ascontiguousarray(mask[window])


def pad_to(image, mask, size):
    """Pad bottom/right up to at least ``size`` = (h, w): image with 0, mask with ignore (255)."""
    ph, pw = max(0, size[0] - mask.shape[0]), max(0, size[1] - mask.shape[1])
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    return image, mask
