"""Segmentation metrics from one confusion matrix, and masks turned into boxes.

Every score here is a function of the dataset-level **confusion matrix**
``M[t, p]`` = number of pixels of true class ``t`` predicted as class ``p``,
summed over every image (pixels whose truth is ``ignore_index`` are left out).
For class ``c``::

    TP = M[c, c]            FN = sum_p M[c, p] - TP      FP = sum_t M[t, c] - TP
    acc_c  = TP / (TP + FN)                  (per-class accuracy = recall)
    IoU_c  = TP / (TP + FP + FN)             (Jaccard index)
    Dice_c = 2 TP / (2 TP + FP + FN)         (F1 score)
    aAcc   = sum_c TP / sum M                (pixel accuracy over all classes)

Accumulating ``M`` and scoring once is not the same as averaging per-image
scores: a large image weighs more, exactly as in mmsegmentation's "aAcc/mIoU".

**Absent classes.** A class that appears neither in the ground truth nor in the
prediction has ``TP + FP + FN = 0``: its IoU and Dice are 0/0 and reported as
NaN, and the means (mIoU, mDice) average over the classes that are *not* NaN
(a dataset without water should not score 0 or 1 for water). Per-class
accuracy is NaN whenever the class has no ground-truth pixel (nothing to get
right), and mAcc averages the non-NaN ones. If every class is NaN, the mean is NaN.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy


def _as_array(x) -> np.ndarray:
    from .tensor import Tensor

    return to_numpy(x.data if isinstance(x, Tensor) else x)


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts ``M[t, p]`` over all pixels of ``pred`` and ``target``.

    ``pred`` and ``target`` are integer class maps of the same shape (any
    number of dimensions, e.g. (N, H, W)). Target pixels equal to
    ``ignore_index`` are skipped; any other value outside ``[0, num_classes)``
    in either array is an error.
    """
    pred, target = _as_array(pred), _as_array(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}; they must match")
    for name, a in (("pred", pred), ("target", target)):
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    keep = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    t = target[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    for name, a in (("target", t), ("pred", p)):
        bad = (a < 0) | (a >= num_classes)
        if bad.any():
            raise ValueError(
                f"{name} holds value {a[bad][0]}, which is neither a class in [0, {num_classes - 1}] "
                f"nor ignore_index={ignore_index}"
            )
    # Each (t, p) pair becomes the single index t*C + p; one bincount counts them all.
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) if there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def scores(matrix: np.ndarray) -> dict:
    """All scores of a confusion matrix (see the module docstring for formulas and NaN rules).

    Returns a dict with per-class arrays ``acc``, ``iou``, ``dice`` (float64,
    NaN where undefined) and scalars ``aAcc``, ``mAcc``, ``mIoU``, ``mDice``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    fn = m.sum(axis=1) - tp
    fp = m.sum(axis=0) - tp
    acc = _ratio(tp, tp + fn)
    iou = _ratio(tp, tp + fp + fn)
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    total = m.sum()
    return {
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mAcc": _nanmean(acc),
        "mIoU": _nanmean(iou),
        "mDice": _nanmean(dice),
        "acc": acc,
        "iou": iou,
        "dice": dice,
    }


class ConfusionMatrix:
    """A confusion matrix accumulated batch by batch::

        cm = ConfusionMatrix(num_classes=4)
        for images, masks in loader:
            cm.update(model(images).argmax(1), masks)
        print(cm.scores()["mIoU"])
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def reset(self) -> None:
        self.matrix[:] = 0

    def scores(self) -> dict:
        return scores(self.matrix)


def format_table(result: dict, class_names=None, fmt: str = "text") -> str:
    """A per-class table (IoU, Dice, Acc in percent) and the summary line, as text or Markdown."""
    n = len(result["iou"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]

    def pct(v):
        return "nan" if np.isnan(v) else f"{100 * v:.2f}"

    rows = [[names[c], pct(result["iou"][c]), pct(result["dice"][c]), pct(result["acc"][c])] for c in range(n)]
    header = ["class", "IoU", "Dice", "Acc"]
    summary = ", ".join(f"{k} {pct(result[k])}" for k in ("aAcc", "mIoU", "mDice", "mAcc"))
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + f"\n\n{summary} (percent)\n"
    width = max(len(h) for h in names + ["class"])
    lines = [f"{header[0]:<{width}}  " + "  ".join(f"{h:>6}" for h in header[1:])]
    lines += [f"{r[0]:<{width}}  " + "  ".join(f"{v:>6}" for v in r[1:]) for r in rows]
    return "\n".join(lines) + f"\n{summary} (percent)"


# ---------------------------------------------------------------- masks to boxes


def label_regions(binary: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Connected regions of a 2-D boolean image: (labels, count), labels 1..count, 0 outside.

    Every foreground pixel starts with its own flat index as label; each round
    (a) takes the minimum label over the pixel and its neighbours, then
    (b) *pointer-jumps*, ``label = label[label]``, until the labels stop
    changing. (a) spreads the minimum one pixel per round; (b) follows the
    chains it builds, so long thin regions (rivers) converge in far fewer
    rounds than their length. At the fixed point every region carries the
    smallest index it contains; the labels are then renumbered 1..count in
    raster order of those minima.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    binary = np.asarray(binary, dtype=bool)
    h, w = binary.shape
    big = h * w  # label of background: larger than any pixel index
    padded = np.full((h + 2, w + 2), big, dtype=np.int64)
    inner = padded[1:-1, 1:-1]
    inner[binary] = np.flatnonzero(binary)
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    flat = np.full(big + 1, big, dtype=np.int64)  # flat[i] = current label of pixel i
    while True:
        lowest = inner.copy()
        for dy, dx in offsets:
            np.minimum(lowest, padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w], out=lowest)
        lowest[~binary] = big
        flat[:big] = lowest.reshape(-1)
        while True:  # pointer jumping
            jumped = flat[flat]
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        new = flat[:big].reshape(h, w)
        if np.array_equal(new, inner):
            break
        inner[...] = new
    roots, labels = np.unique(inner[binary], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int64)
    out[binary] = labels.reshape(-1) + 1
    return out, len(roots)


def masks_to_boxes(mask, classes=None, ignore_index: int | None = 255, connectivity: int = 4):
    """One bounding box per connected region of each class of a 2-D class mask.

    Returns ``(boxes, labels, areas)``: ``boxes`` (K, 4) int64 rows
    ``[x_min, y_min, x_max, y_max]`` with inclusive maxima (torchvision's
    convention), ``labels`` (K,) the class of each region, and ``areas`` (K,)
    its pixel count. ``classes`` picks the classes to box (default: every class
    present except ``ignore_index``). Comparing ``areas`` with the box area
    ``(x_max - x_min + 1) * (y_max - y_min + 1)`` shows what a box loses
    against a pixel map: a diagonal river fills a few percent of its box.
    """
    mask = _as_array(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (H, W) class map, got shape {mask.shape}")
    if classes is None:
        classes = [int(c) for c in np.unique(mask) if c != ignore_index]
    boxes, labels, areas = [], [], []
    for c in classes:
        regions, count = label_regions(mask == c, connectivity)
        if count == 0:
            continue
        ys, xs = np.nonzero(regions)
        ids = regions[ys, xs] - 1
        x0 = np.full(count, np.iinfo(np.int64).max)
        y0 = x0.copy()
        x1 = np.full(count, -1)
        y1 = x1.copy()
        np.minimum.at(x0, ids, xs)
        np.minimum.at(y0, ids, ys)
        np.maximum.at(x1, ids, xs)
        np.maximum.at(y1, ids, ys)
        boxes.append(np.stack([x0, y0, x1, y1], axis=1))
        labels.append(np.full(count, c, dtype=np.int64))
        areas.append(np.bincount(ids, minlength=count))
    if not boxes:
        return np.zeros((0, 4), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(boxes).astype(np.int64), np.concatenate(labels), np.concatenate(areas).astype(np.int64)


__all__ = ["confusion_matrix", "scores", "ConfusionMatrix", "format_table", "label_regions", "masks_to_boxes"]
