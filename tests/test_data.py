"""Data: synthetic scenes, folder datasets (and their errors), the real dataset, paired
augmentation, the DataLoader, and the pictures of minseg.viz."""
import numpy as np
import pytest
from PIL import Image

from minseg.data import (
    Compose,
    DataError,
    DataLoader,
    FolderDataset,
    RandomCrop,
    RandomFlip,
    Subset,
    SyntheticScenes,
    median_frequency_weights,
    random_split,
)
from minseg.metrics import ConfusionMatrix
from minseg.viz import PALETTE, mask_image, overlay, plot_curves, prediction_grid, voc_palette

# ------------------------------------------------------------------ synthetic


def test_synthetic_scenes_are_deterministic_per_seed_and_index():
    a, b = SyntheticScenes(6, size=40, seed=3), SyntheticScenes(2, size=40, seed=3)
    for i in range(2):
        np.testing.assert_array_equal(a[i][0], b[i][0])  # scene i does not depend on n
        np.testing.assert_array_equal(a[i][1], b[i][1])
    assert not np.array_equal(a[0][0], SyntheticScenes(1, size=40, seed=4)[0][0])
    assert not np.array_equal(a[0][1], a[1][1])
    image, mask = a[5]
    assert image.shape == (3, 40, 40) and image.dtype == np.float32
    assert mask.shape == (40, 40) and mask.dtype == np.int64
    assert 0 <= image.min() and image.max() <= 1
    with pytest.raises(IndexError):
        a[6]


def test_synthetic_scenes_have_all_classes_and_need_more_than_colour():
    ds = SyntheticScenes(80, size=48, seed=0)
    pixels = [ds[i] for i in range(80)]
    masks = np.stack([m for _, m in pixels])
    freq = np.bincount(masks.ravel(), minlength=4) / masks.size
    assert set(np.unique(masks)) == {0, 1, 2, 3}
    assert freq[0] > 0.5 and all(freq[1:] > 0.02), freq  # ground dominates, every class is visible
    # A per-pixel Gaussian colour classifier (quadratic discriminant), fit on half the scenes and
    # scored on the other half, must stay clearly below the 0.85 mIoU that `minseg train` reaches:
    # the classes are not separable by colour alone.
    colours = np.stack([im.reshape(3, -1).T for im, _ in pixels]).astype(np.float64)
    labels = masks.reshape(80, -1)
    fit_x, fit_y = colours[:40].reshape(-1, 3), labels[:40].ravel()
    scores = []
    for c in range(4):
        xc = fit_x[fit_y == c]
        mu, cov = xc.mean(0), np.cov(xc.T)
        d = colours[40:].reshape(-1, 3) - mu
        maha = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
        scores.append(-0.5 * maha - 0.5 * np.linalg.slogdet(cov)[1] + np.log(len(xc) / len(fit_y)))
    cm = ConfusionMatrix(4)
    cm.update(np.argmax(scores, axis=0), labels[40:].ravel())
    assert cm.scores()["mIoU"] < 0.82


# -------------------------------------------------------------------- folder


def write_folder(root, n=3, size=(10, 12), mask_mode="L", values=(0, 1, 2), ext=".png"):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"img{i}{ext}")
        mask = rng.choice(values, size=(h, w)).astype(np.uint8)
        mask_image(mask).save(root / "masks" / f"img{i}.png") if mask_mode == "P" else Image.fromarray(mask, "L").save(
            root / "masks" / f"img{i}.png"
        )
    return root


@pytest.mark.parametrize("mask_mode", ["L", "P"])
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_folder_dataset_reads_images_and_masks(tmp_path, mask_mode, ext):
    write_folder(tmp_path, mask_mode=mask_mode, values=(0, 2, 255), ext=ext)
    ds = FolderDataset(tmp_path)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.classes == ("class0", "class1", "class2")
    image, mask = ds[1]
    assert image.shape == (3, 10, 12) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    assert set(np.unique(mask)) <= {0, 2, 255}
    assert np.asarray(Image.open(tmp_path / "masks" / "img1.png")).tolist() == mask.tolist()
    (tmp_path / "classes.txt").write_text("ground\nroof\n")
    assert FolderDataset(tmp_path, num_classes=4).classes == ("ground", "roof", "class2", "class3")


def corrupt(root):
    (root / "images" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


def mismatched(root):
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "img0.png")


def rgb_mask(root):
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "masks" / "img2.png")


def missing_mask(root):
    (root / "masks" / "img2.png").unlink()


def empty(root):
    for p in (root / "images").iterdir():
        p.unlink()


def bad_value(root):
    Image.fromarray(np.full((10, 12), 7, np.uint8)).save(root / "masks" / "img0.png")


@pytest.mark.parametrize(
    "damage, message",
    [
        (corrupt, "cannot read image .*img1.png"),
        (mismatched, "img0.png is 12x10 but its mask .* is 5x5"),
        (rgb_mask, "img2.png has mode 'RGB'"),
        (missing_mask, "has no mask"),
        (empty, "no .png/.jpg images"),
        (bad_value, "holds value 7, which is neither a class id in \\[0, 2\\] nor 255"),
    ],
)
def test_folder_dataset_errors_name_the_file(tmp_path, damage, message):
    write_folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=message):
        FolderDataset(tmp_path, num_classes=3)


def test_folder_dataset_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(DataError, match="images/ and masks/"):
        FolderDataset(tmp_path)


def test_random_split_is_seeded_and_disjoint():
    ds = SyntheticScenes(10, size=8)
    train, val = random_split(ds, 0.3, seed=1)
    assert len(train) == 7 and len(val) == 3
    assert not set(train.indices) & set(val.indices)
    assert random_split(ds, 0.3, seed=1)[1].indices == val.indices
    assert random_split(ds, 0.3, seed=2)[1].indices != val.indices


# --------------------------------------------------------------- real dataset


def test_scratch_assay_tiles():
    from minseg.data import ScratchAssay
    from minseg.data.real import sample_path

    try:
        sample_path()
    except DataError:
        pytest.skip("ndev-sampledata is not installed (pip install --no-deps ndev-sampledata)")
    train, val = ScratchAssay("train", tile=64), ScratchAssay("val", tile=64)
    # 210 x 576 frames give 3 x 9 tiles; 8 training and 2 validation time points
    assert (len(train), len(val)) == (8 * 27, 2 * 27)
    image, mask = train[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
    masks = np.stack([m for _, m in (train[i] for i in range(len(train)))])
    assert set(np.unique(masks)) == {0, 1, 2}


# -------------------------------------------------------------- augmentation


def coded_pair(h, w):
    """An image whose channels store each pixel's (row, col), and a mask storing row*w+col."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy, xx, np.zeros_like(yy)]).astype(np.float32)
    return image, (yy * w + xx).astype(np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_flip_and_crop_move_image_and_mask_together(seed):
    h, w = 7, 9
    image, mask = coded_pair(h, w)
    t = Compose([RandomCrop((5, 4)), RandomFlip()])
    img2, mask2 = t(image, mask, np.random.default_rng(seed))
    assert img2.shape == (3, 5, 4) and mask2.shape == (5, 4)
    # every output pixel still pairs an image pixel with the mask value of the same source pixel
    np.testing.assert_array_equal(img2[0] * w + img2[1], mask2)


def test_random_crop_pads_small_images_with_ignore():
    image, mask = coded_pair(3, 2)
    img2, mask2 = RandomCrop(4)(image, mask, np.random.default_rng(0))
    assert img2.shape == (3, 4, 4)
    assert (mask2[3:, :] == 255).all() and (mask2[:, 2:] == 255).all()
    assert (img2[:, 3:, :] == 0).all()
    np.testing.assert_array_equal(mask2[:3, :2], mask)


def test_flip_probabilities():
    image, mask = coded_pair(2, 3)
    flipped = RandomFlip(horizontal=1.0, vertical=0.0)(image, mask, np.random.default_rng(0))[1]
    np.testing.assert_array_equal(flipped, mask[:, ::-1])
    same = RandomFlip(horizontal=0.0, vertical=0.0)(image, mask, np.random.default_rng(0))[1]
    np.testing.assert_array_equal(same, mask)


# -------------------------------------------------------------------- loader


def test_dataloader_batches_shuffle_and_replay():
    ds = SyntheticScenes(10, size=8, seed=0)
    loader = DataLoader(ds, batch_size=4, shuffle=True, seed=5, transform=RandomFlip())
    epoch0 = list(loader)
    assert [b[0].shape for b in epoch0] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert epoch0[0][1].dtype == np.int64 and len(loader) == 3
    epoch1 = list(loader)  # the next epoch: a new order
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(epoch0, epoch1))
    loader.set_epoch(0)  # replay epoch 0 exactly (what --resume relies on)
    for (x, m), (x0, m0) in zip(loader, epoch0):
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(m, m0)
    # every sample exactly once per epoch, in a seeded order
    plain = DataLoader(ds, batch_size=4, shuffle=True, seed=5)
    seen = sorted(m.tobytes() for _, masks in plain for m in masks)
    assert seen == sorted(ds[i][1].tobytes() for i in range(10))
    assert len(DataLoader(ds, batch_size=4, drop_last=True)) == 2
    ordered = list(DataLoader(Subset(ds, [3, 1]), batch_size=2))[0][1]
    np.testing.assert_array_equal(ordered, np.stack([ds[3][1], ds[1][1]]))


def test_dataloader_refuses_mixed_sizes(tmp_path):
    write_folder(tmp_path, n=2)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "images" / "img1.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "masks" / "img1.png")
    ds = FolderDataset(tmp_path)
    assert ds.uniform_size is False
    with pytest.raises(DataError, match="different sizes"):
        list(DataLoader(ds, batch_size=2))
    assert len(list(DataLoader(ds, batch_size=2, transform=RandomCrop(6)))) == 1


# ----------------------------------------------------------------------- viz


def test_voc_palette_and_indexed_png(tmp_path):
    assert voc_palette(6).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]]
    assert PALETTE[255].tolist() == [224, 224, 192]  # VOC's "void" colour for ignore
    mask = np.array([[0, 1], [3, 255]])
    mask_image(mask).save(tmp_path / "m.png")
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P" and np.asarray(im).tolist() == mask.tolist()  # pixel values are class ids
    assert np.asarray(im.convert("RGB"))[0, 1].tolist() == [128, 0, 0]


def test_overlay_blends_classes_and_keeps_background_and_ignored_pixels():
    image = np.full((3, 1, 4), 0.5, np.float32)  # grey 128
    out = overlay(image, np.array([[0, 1, 2, 255]]), alpha=0.5)
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [128, 128, 128]  # background: untouched
    assert out[0, 1].tolist() == [128, 64, 64]  # (128 + 128) / 2, (128 + 0) / 2
    assert out[0, 2].tolist() == [64, 128, 64]
    assert out[0, 3].tolist() == [128, 128, 128]  # ignored: untouched
    assert overlay(image, np.array([[0, 1, 2, 255]]), background=None)[0, 0].tolist() == [64, 64, 64]


def test_plot_curves_and_grid(tmp_path):
    plot_curves(tmp_path / "c.png", {"train": [1.0, 0.5, 0.25], "val": [1.2, float("nan"), 0.4]}, title="loss")
    im = Image.open(tmp_path / "c.png")
    assert im.size == (480, 320)
    assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 3  # more than a blank canvas
    plot_curves(tmp_path / "one.png", {"mIoU": [0.5]})  # a single point must not divide by zero
    ds = SyntheticScenes(2, size=8)
    g = prediction_grid([ds[0][0], ds[1][0]], [ds[0][1], ds[1][1]], [ds[0][1], ds[1][1]], scale=1, titles=None)
    assert g.shape == (2 * 8 + 2, 3 * 8 + 4, 3)


def test_prediction_grid_has_column_titles_and_a_class_legend():
    ds = SyntheticScenes(2, size=32)
    images, truths = [ds[i][0] for i in range(2)], [ds[i][1] for i in range(2)]
    bare = prediction_grid(images, truths, truths, titles=None)
    titled = prediction_grid(images, truths, truths)
    annotated = prediction_grid(images, truths, truths, classes=ds.classes)
    header = titled.shape[0] - bare.shape[0]
    assert header > 0 and titled.shape[1] == bare.shape[1]
    np.testing.assert_array_equal(titled[header:], bare)  # the samples sit unchanged below the header
    head = titled[:header]
    assert (head < 128).any() and (head == 255).any()  # dark text on white
    # each title is centred over its column: dark pixels appear in all three column spans
    col = 32 * 2 + 4
    assert all((head[:, j * col : j * col + 64] < 128).any() for j in range(3))
    strip = annotated[titled.shape[0] :]
    assert strip.shape[0] > 0
    colours = {tuple(c) for c in strip.reshape(-1, 3).tolist()}
    assert all(tuple(int(v) for v in PALETTE[c]) in colours for c in range(ds.num_classes))  # one swatch per class


def test_median_frequency_weights_by_hand():
    class Masks:
        def __init__(self, masks):
            self.masks = masks

        def __len__(self):
            return len(self.masks)

        def __getitem__(self, i):
            return None, self.masks[i]

    # image A (4 labelled pixels): 3 x class 0, 1 x class 1; image B (4 labelled + 2 ignored): 2 x class 0, 2 x class 2
    a = np.array([[0, 0], [0, 1]])
    b = np.array([[0, 0, 255], [2, 2, 255]])
    w = median_frequency_weights(Masks([a, b]), num_classes=4)
    # freq_0 = 5/8 (in both images), freq_1 = 1/4 (image A only), freq_2 = 2/4 (image B only); median 1/2
    np.testing.assert_allclose(w, [0.5 / (5 / 8), 0.5 / (1 / 4), 1.0, 0.0])  # class 3 never appears: weight 0
    with pytest.raises(ValueError, match="entirely ignored"):
        median_frequency_weights(Masks([np.full((2, 2), 255)]), num_classes=2)
