"""The dataset protocol, subsets and a seeded train/val split.

A dataset is anything with ``len(ds)`` and ``ds[i] -> (image, mask)``:
``image`` float32 (C, H, W) in [0, 1], ``mask`` int64 (H, W) with class ids
and 255 for pixels to ignore. Datasets also carry ``classes`` (names),
``num_classes`` and ``in_channels``.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


class DataError(ValueError):
    """Bad input data (unreadable file, wrong sizes, invalid mask values); the message names the file."""


class Dataset:
    classes: tuple = ()
    num_classes: int = 0
    in_channels: int = 3
    uniform_size: bool | None = None  # True when every sample has the same (H, W); None if unknown

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError


class Subset(Dataset):
    """The items of ``dataset`` at ``indices``, in that order."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.classes = dataset.classes
        self.num_classes = dataset.num_classes
        self.in_channels = dataset.in_channels
        self.uniform_size = True if dataset.uniform_size else None  # a subset of a uniform set is uniform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


def random_split(dataset, val_fraction: float = 0.2, seed: int = 0) -> tuple[Subset, Subset]:
    """(train, val) subsets from a seeded shuffle; val gets round(val_fraction * n) items, at least 1."""
    n = len(dataset)
    if n < 2:
        raise DataError(f"need at least 2 samples to split into train and val, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))


def median_frequency_weights(dataset, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Class weights by median-frequency balancing (Eigen & Fergus 2015), float64 (num_classes,).

    freq_c = (pixels of class c) / (pixels of the images where c appears), counting
    only non-ignored pixels, and w_c = median_c(freq_c) / freq_c: a class as
    frequent as the median class weighs 1, a class ten times rarer weighs 10.
    A class that appears in no mask gets weight 0 (there is nothing to weigh).
    Every mask of ``dataset`` is read once.
    """
    pixels = np.zeros(num_classes)
    image_pixels = np.zeros(num_classes)
    for i in range(len(dataset)):
        mask = np.asarray(dataset[i][1])
        labelled = mask[mask != ignore_index]
        counts = np.bincount(labelled.reshape(-1), minlength=num_classes)[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += labelled.size
    present = pixels > 0
    if not present.any():
        raise DataError("every training mask is entirely ignored: no class frequencies to balance")
    freq = np.where(present, pixels / np.maximum(image_pixels, 1), 0.0)
    weights = np.zeros(num_classes)
    weights[present] = np.median(freq[present]) / freq[present]
    return weights
