"""Datasets, augmentation and batching.

* :class:`SyntheticScenes` — seeded aerial-style scenes (the default; no download).
* :class:`FolderDataset` — ``images/`` and ``masks/`` from a folder of PNG/JPG files.
* :class:`ScratchAssay` — a real microscopy time lapse from the ``ndev-sampledata`` package.
* :class:`DataLoader`, :class:`RandomFlip`, :class:`RandomCrop`, :func:`random_split`,
  :func:`median_frequency_weights`.
"""
from .dataset import IGNORE_INDEX, DataError, Dataset, Subset, median_frequency_weights, random_split
from .folder import FolderDataset, load_image, load_mask
from .loader import DataLoader
from .real import ScratchAssay
from .synthetic import SyntheticScenes, make_scene
from .transforms import Compose, RandomCrop, RandomFlip, pad_to

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Dataset",
    "Subset",
    "random_split",
    "median_frequency_weights",
    "FolderDataset",
    "load_image",
    "load_mask",
    "DataLoader",
    "ScratchAssay",
    "SyntheticScenes",
    "make_scene",
    "Compose",
    "RandomCrop",
    "RandomFlip",
    "pad_to",
]
