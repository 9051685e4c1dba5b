"""FolderDataset: your own images and masks from a folder.

Layout::

    root/images/<stem>.png|.jpg|.jpeg     RGB (grey, palette or RGBA are converted to RGB)
    root/masks/<stem>.png                 8-bit class ids: grayscale or palette ('P') PNG,
                                          the pixel value (palette index) is the class; 255 = ignore
    root/classes.txt                      optional: one class name per line (or give classes_file)

The constructor checks the whole folder once, so that training fails at the
start with a message naming the file, not halfway through an epoch: every
image has a mask of the same size, every file decodes, and every mask value
is a class id or 255. The number of classes is ``max class id + 1`` over all
masks unless ``num_classes`` is given.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import IGNORE_INDEX, DataError, Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_MODES = ("L", "P", "I", "I;16", "1")


def load_image(path) -> np.ndarray:
    """An image file as float32 (3, H, W) in [0, 1]; DataError if it does not decode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except Exception as e:  # Pillow raises several types for truncated/corrupt files
        raise DataError(f"cannot read image {path}: {e}") from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1) / 255.0)


def load_mask(path) -> np.ndarray:
    """A single-channel mask PNG as int64 (H, W) (palette PNGs give their indices)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise DataError(
                    f"mask {path} has mode {im.mode!r}; masks must be single-channel PNGs "
                    "(8-bit grayscale or palette) whose pixel values are class ids"
                )
            return np.asarray(im, dtype=np.int64)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {e}") from None


class FolderDataset(Dataset):
    def __init__(self, root, num_classes: int | None = None, classes_file=None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset folder {root} does not exist")
        image_dir, mask_dir = root / "images", root / "masks"
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise DataError(f"{root} must contain images/ and masks/ folders; {d} is missing")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"no .png/.jpg images in {image_dir}")
        self.pairs = []
        for img in images:
            mask = mask_dir / (img.stem + ".png")
            if not mask.is_file():
                raise DataError(f"image {img} has no mask: expected {mask}")
            self.pairs.append((img, mask))
        self.root = root
        self.num_classes = self._check(num_classes)
        names_file = root / "classes.txt" if classes_file is None else Path(classes_file)
        names = names_file.read_text().split("\n") if names_file.is_file() else []
        names = [n.strip() for n in names if n.strip()]
        self.classes = tuple(names[i] if i < len(names) else f"class{i}" for i in range(self.num_classes))

    def _check(self, num_classes):
        if num_classes is not None and num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {num_classes}")
        largest, sizes = -1, set()
        for img, mask_path in self.pairs:
            image, mask = load_image(img), load_mask(mask_path)
            sizes.add(mask.shape)
            if image.shape[1:] != mask.shape:
                raise DataError(
                    f"image {img} is {image.shape[2]}x{image.shape[1]} but its mask {mask_path} is "
                    f"{mask.shape[1]}x{mask.shape[0]} (width x height); they must match"
                )
            values = np.unique(mask)
            classes = values[values != IGNORE_INDEX]
            limit = IGNORE_INDEX if num_classes is None else num_classes
            bad = classes[(classes < 0) | (classes >= limit)]
            if bad.size:
                raise DataError(
                    f"mask {mask_path} holds value {bad[0]}, which is neither a class id in [0, {limit - 1}] "
                    f"nor {IGNORE_INDEX} (ignore)"
                )
            if classes.size:
                largest = max(largest, int(classes.max()))
        self.uniform_size = len(sizes) == 1
        if num_classes is not None:
            return int(num_classes)
        if largest < 0:
            raise DataError(f"every mask in {self.root / 'masks'} is entirely ignore (255): no class to learn")
        return max(largest + 1, 2)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        img, mask = self.pairs[index]
        return load_image(img), load_mask(mask)
