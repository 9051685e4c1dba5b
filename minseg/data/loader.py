"""DataLoader: batches of (images, masks) as NumPy arrays, shuffled and augmented from a seed.

Epoch ``e`` visits the samples in ``default_rng([seed, e]).permutation(n)``
order (or in index order without ``shuffle``) and augments sample ``i`` with
``default_rng([seed, e, i])``. So the batches of an epoch depend only on
(seed, epoch), never on what ran before: a resumed run sees exactly the
batches an uninterrupted one would have seen.

``sampler`` (e.g. :class:`minseg.distributed.DistributedSampler`) replaces that
order by the indices it yields; the loader passes its epoch to the sampler's
``set_epoch`` before each pass, so the augmentation seeds and the sampler's
order follow the same epoch.
"""
from __future__ import annotations

import numpy as np

from .dataset import DataError


class DataLoader:
    def __init__(self, dataset, batch_size: int = 8, shuffle: bool = False, seed: int = 0, transform=None, drop_last: bool = False,
                 sampler=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if sampler is not None and shuffle:
            raise ValueError("sampler and shuffle=True exclude each other: the sampler decides the order")
        self.sampler = sampler
        self.dataset, self.batch_size, self.shuffle = dataset, int(batch_size), shuffle
        self.seed, self.transform, self.drop_last = int(seed), transform, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration replays."""
        self.epoch = int(epoch)

    def __len__(self):
        n = len(self.dataset) if self.sampler is None else len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
        else:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        n = len(order)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            yield self._collate([self._item(int(i)) for i in order[start : start + self.batch_size]])
        self.epoch += 1

    def _item(self, index):
        image, mask = self.dataset[index]
        if self.transform is not None:
            image, mask = self.transform(image, mask, np.random.default_rng([self.seed, self.epoch, index]))
        return image, mask

    @staticmethod
    def _collate(items):
        shapes = {(im.shape, m.shape) for im, m in items}
        if len(shapes) > 1:
            raise DataError(
                f"cannot batch samples of different sizes {sorted(shapes)}: crop them to one size "
                "(RandomCrop) or use batch_size=1"
            )
        images = np.stack([im for im, _ in items]).astype(np.float32, copy=False)
        masks = np.stack([m for _, m in items]).astype(np.int64, copy=False)
        return images, masks
