"""Metrics against a direct per-pixel computation, and masks_to_boxes against scipy.ndimage."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minseg import masks_to_boxes
from minseg.metrics import ConfusionMatrix, confusion_matrix, format_table, label_regions, scores

IGNORE = 255


@st.composite
def batches(draw):
    """A few (pred, target) batches with C classes; some target pixels ignored, some classes absent."""
    c = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draw(st.integers(1, 3))):
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7)))
        # drawing from a random subset of classes makes absent classes common
        used = rng.choice(c, size=rng.integers(1, c + 1), replace=False)
        target = rng.choice(used, size=shape)
        target[rng.random(shape) < draw(st.sampled_from([0.0, 0.2, 1.0]))] = IGNORE
        pred = rng.choice(used if rng.random() < 0.5 else np.arange(c), size=shape)
        out.append((pred, target))
    return c, out


def direct_scores(c, pairs):
    """Per-class counts by looping over pixels one by one: the definitions, with no matrix."""
    tp, fp, fn, total, correct = np.zeros(c), np.zeros(c), np.zeros(c), 0, 0
    for pred, target in pairs:
        for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
            if t == IGNORE:
                continue
            total += 1
            if p == t:
                tp[t] += 1
                correct += 1
            else:
                fp[p] += 1
                fn[t] += 1
    nan = float("nan")
    iou = [tp[k] / (tp[k] + fp[k] + fn[k]) if tp[k] + fp[k] + fn[k] else nan for k in range(c)]
    dice = [2 * tp[k] / (2 * tp[k] + fp[k] + fn[k]) if tp[k] + fp[k] + fn[k] else nan for k in range(c)]
    acc = [tp[k] / (tp[k] + fn[k]) if tp[k] + fn[k] else nan for k in range(c)]

    def mean(v):
        v = [x for x in v if x == x]
        return sum(v) / len(v) if v else nan

    return dict(iou=iou, dice=dice, acc=acc, mIoU=mean(iou), mDice=mean(dice), mAcc=mean(acc), aAcc=correct / total if total else nan)


@settings(max_examples=60)
@given(batches())
def test_scores_match_direct_per_pixel_computation(case):
    c, pairs = case
    cm = ConfusionMatrix(c, ignore_index=IGNORE)
    for pred, target in pairs:
        cm.update(pred, target)
    got, want = cm.scores(), direct_scores(c, pairs)
    # Both sides are ratios of the same integer counts: they agree to float64 round-off.
    for key in ("iou", "dice", "acc"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0, equal_nan=True, err_msg=key)
    for key in ("mIoU", "mDice", "mAcc", "aAcc"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0, equal_nan=True, err_msg=key)
    # the accumulated matrix equals the matrix of all batches at once
    whole = confusion_matrix(
        np.concatenate([p.reshape(-1) for p, _ in pairs]), np.concatenate([t.reshape(-1) for _, t in pairs]), c, IGNORE
    )
    np.testing.assert_array_equal(cm.matrix, whole)


def test_absent_class_is_nan_and_excluded_from_means():
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 0, 1, 0]])
    s = scores(confusion_matrix(pred, target, num_classes=3))
    assert np.isnan(s["iou"][2]) and np.isnan(s["dice"][2]) and np.isnan(s["acc"][2])
    np.testing.assert_allclose(s["iou"][:2], [2 / 3, 1 / 2])
    assert s["mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # over the 2 present classes, not 3
    assert s["aAcc"] == pytest.approx(3 / 4)


def test_class_only_in_prediction_scores_zero_iou():
    s = scores(confusion_matrix(np.array([2, 0]), np.array([0, 0]), num_classes=3))
    assert s["iou"][2] == 0.0 and np.isnan(s["acc"][2])  # a false positive is a real error


def test_all_ignored_gives_nan_everywhere():
    s = scores(confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), IGNORE), num_classes=2))
    assert np.isnan(s["mIoU"]) and np.isnan(s["aAcc"])
    assert "nan" in format_table(s)


def test_invalid_values_and_shapes_raise():
    with pytest.raises(ValueError, match="neither a class"):
        confusion_matrix(np.array([0]), np.array([7]), num_classes=3)
    with pytest.raises(ValueError, match="neither a class"):
        confusion_matrix(np.array([3]), np.array([0]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(2, int), np.zeros(3, int), num_classes=3)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(np.zeros(2), np.zeros(2, int), num_classes=3)


def test_format_table_markdown_lists_every_class():
    s = scores(np.array([[3, 1], [0, 4]]))
    table = format_table(s, ["ground", "roof"], fmt="markdown")
    assert "| ground |" in table and "| roof |" in table and "mIoU" in table


# ------------------------------------------------------------------ masks_to_boxes


@settings(max_examples=40)
@given(
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    density=st.floats(0.05, 0.95),
    connectivity=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**32 - 1),
)
def test_label_regions_matches_scipy(h, w, density, connectivity, seed):
    ndimage = pytest.importorskip("scipy.ndimage")
    binary = np.random.default_rng(seed).random((h, w)) < density
    labels, count = label_regions(binary, connectivity)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    want, want_count = ndimage.label(binary, structure=structure)
    assert count == want_count
    np.testing.assert_array_equal(labels, want)  # same raster-order numbering as scipy


@settings(max_examples=30)
@given(h=st.integers(1, 20), w=st.integers(1, 20), classes=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_masks_to_boxes_one_tight_box_per_region(h, w, classes, seed):
    ndimage = pytest.importorskip("scipy.ndimage")  # an independent labelling to compare with
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, classes, (h, w))
    mask[rng.random((h, w)) < 0.1] = IGNORE
    boxes, labels, areas = masks_to_boxes(mask)
    assert len(boxes) == len(labels) == len(areas)
    for c in np.unique(mask[mask != IGNORE]):
        regions, count = ndimage.label(mask == c)  # 4-connectivity, raster-order numbering
        assert (labels == c).sum() == count
        for k, (x0, y0, x1, y1) in enumerate(boxes[labels == c]):
            ys, xs = np.nonzero(regions == k + 1)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
            assert areas[labels == c][k] == len(xs)
    assert len(labels) == sum(ndimage.label(mask == c)[1] for c in np.unique(mask[mask != IGNORE]))
    assert IGNORE not in labels


def test_masks_to_boxes_example_and_class_filter():
    mask = np.array(
        [
            [1, 1, 0, 2],
            [0, 0, 0, 2],
            [1, 0, 0, 0],
        ]
    )
    boxes, labels, areas = masks_to_boxes(mask, classes=[1, 2])
    np.testing.assert_array_equal(boxes, [[0, 0, 1, 0], [0, 2, 0, 2], [3, 0, 3, 1]])
    np.testing.assert_array_equal(labels, [1, 1, 2])
    np.testing.assert_array_equal(areas, [2, 1, 2])
    empty = masks_to_boxes(np.zeros((3, 3), int), classes=[1])
    assert empty[0].shape == (0, 4)
    with pytest.raises(ValueError, match="2-D"):
        masks_to_boxes(np.zeros((1, 3, 3), int))
