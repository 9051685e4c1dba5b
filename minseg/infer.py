"""Sliding-window inference: segment an image of any size with memory bounded by the window batch.

A network trained on 64x64 tiles can run on a 4000x3000 aerial image in one
pass, but every activation then has the image's size: the memory grows with
the image, many times over. :func:`predict` instead walks windows of the
training tile size over the image, ``overlap`` apart, runs ``batch_size``
windows at a time, and blends the logits of the windows that cover a pixel::

    logits(pixel) = sum_w k_w(pixel) logits_w(pixel) / sum_w k_w(pixel)

with k = 1 inside every window (``blend='mean'``) or a Gaussian centred on the
window (``blend='gaussian'``, sigma = window / 8, as nnU-Net), which trusts
the middle of a window, where the network saw context on every side, more
than its border, where it saw zero padding. Only the running sums (float64,
C x H x W) and the weights (H x W) have the image's size; activations have
the size of one window batch.

Windows start at 0, step ``window * (1 - overlap)`` and the last one is
moved back to end at the image's edge, so no window hangs over the edge and
no pixel is predicted from padding; only an image smaller than a window is
padded (by reflection) up to the window, and the padding is cropped off.
"""
from __future__ import annotations

import math
import sys

import numpy as np

BLENDS = ("mean", "gaussian")
TTAS = (None, "flip")
DEFAULT_WINDOW = 256  # for models that do not know their training tile size


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` pixels ``stride`` apart that cover [0, size); the last ends at ``size``."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}] so that the windows leave no gap, got {stride}")
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def gaussian_weights(window: tuple[int, int]) -> np.ndarray:
    """(h, w) float64 weights exp(-d^2 / (2 sigma^2)) around the window's centre, sigma = size / 8, max 1."""
    axes = []
    for n in window:
        d = np.arange(n) - (n - 1) / 2
        axes.append(np.exp(-(d**2) / (2 * (n / 8) ** 2)))
    return np.outer(*axes)


def _flips(x: np.ndarray, tta):
    """The (batch, undo) pairs of test-time augmentation: the batch as given, and flipped left-right,
    up-down and both (each undo maps the prediction back)."""
    if tta is None:
        return [(x, lambda y: y)]
    pairs = []
    for axes in ((), (3,), (2,), (2, 3)):
        flip = (lambda a, axes=axes: np.flip(a, axes) if axes else a)
        pairs.append((np.ascontiguousarray(flip(x)), flip))
    return pairs


def predict(model, image, window=None, overlap: float = 0.25, blend: str = "mean", batch_size: int = 8, tta=None, progress=None):
    """Logits (C, H, W) float32 of ``model`` on ``image`` (C_in, H, W), by sliding windows.

    ``window``: an int or (h, w); default the model's training tile size
    (``model.tile_size``, set by ``minseg train`` and kept in checkpoints), else
    256. ``overlap`` in [0, 1): the fraction of a window shared with its
    neighbour. ``blend``: 'mean' or 'gaussian' (module docstring).
    ``batch_size``: windows per forward pass (peak memory grows with it).
    ``tta='flip'``: average the logits of the window and of its left-right,
    up-down and doubly flipped copies (each flipped back). ``progress``: a tqdm
    bar over the batches (None: only on a terminal).

    ``softmax`` over dim 0 of the result gives the probabilities and its
    argmax the mask. The model is put in eval mode and run without a graph.
    """
    from . import backend
    from .autograd import no_grad
    from .tensor import Tensor

    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {image.shape}")
    if image.dtype not in (np.float32, np.float64):
        raise TypeError(f"image must be float32 or float64 (values in [0, 1]), got {image.dtype}")
    if window is None:
        window = getattr(model, "tile_size", None) or DEFAULT_WINDOW
    if isinstance(window, (int, np.integer)):
        window = (int(window), int(window))
    if not (len(window) == 2 and all(isinstance(w, (int, np.integer)) and w >= 1 for w in window)):
        raise ValueError(f"window must be a positive int or a pair of them, got {window!r}")
    if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if tta not in TTAS:
        raise ValueError(f"tta must be one of {TTAS}, got {tta!r}")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    _, h, w = image.shape
    wh, ww = window
    # an image smaller than the window is padded up to it (reflection; 'symmetric' handles any pad width)
    ph, pw = max(0, wh - h), max(0, ww - w)
    padded = np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="symmetric") if ph or pw else image
    ys = window_starts(padded.shape[1], wh, max(1, math.floor(wh * (1 - overlap))))
    xs = window_starts(padded.shape[2], ww, max(1, math.floor(ww * (1 - overlap))))
    positions = [(y, x) for y in ys for x in xs]
    kernel = gaussian_weights((wh, ww)) if blend == "gaussian" else np.ones((wh, ww))

    total = None  # sum_w k_w logits_w, float64 so that the 'mean' of identical values is exact
    norm = np.zeros(padded.shape[1:], np.float64)
    model.eval()
    batches = range(0, len(positions), batch_size)
    if progress is not False:
        from tqdm import tqdm

        batches = tqdm(batches, desc="windows", leave=False, file=sys.stderr, disable=None if progress is None else not progress)
    with no_grad():
        for start in batches:
            chunk = positions[start : start + batch_size]
            windows = np.stack([padded[:, y : y + wh, x : x + ww] for y, x in chunk]).astype(np.float32, copy=False)
            logits = 0
            pairs = _flips(windows, tta)
            for batch, undo in pairs:
                logits = logits + undo(backend.to_numpy(model(Tensor(backend.to_backend_array(batch))).data))
            logits = logits / len(pairs) if len(pairs) > 1 else logits
            if total is None:
                total = np.zeros((logits.shape[1],) + padded.shape[1:], np.float64)
            for (y, x), window_logits in zip(chunk, logits):
                total[:, y : y + wh, x : x + ww] += kernel * window_logits
                norm[y : y + wh, x : x + ww] += kernel
    total /= norm
    return total[:, :h, :w].astype(np.float32)


def softmax_inplace(logits: np.ndarray) -> np.ndarray:
    """Probabilities from (C, H, W) logits, overwriting them (no second C x H x W array)."""
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits


__all__ = ["predict", "window_starts", "gaussian_weights", "softmax_inplace", "BLENDS", "DEFAULT_WINDOW"]
