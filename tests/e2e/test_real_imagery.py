"""`minseg` on imagery as people keep it: train/ and val/ folders, --val-dataset, --crop on
large images, losses and class weights for rare classes, the DeepLab model, the divergence
guard, and sliding-window prediction on an image larger than the training tiles."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from minseg import cli
from minseg.cli import load_checkpoint
from minseg.data import FolderDataset, median_frequency_weights
from tests.e2e.test_cli import TINY, folder, run


def split_folder(root, train_sizes, val_sizes, values=(0, 1, 2)):
    folder(root / "train", sizes=train_sizes, values=values)
    folder(root / "val", sizes=val_sizes, values=values)
    (root / "classes.txt").write_text("ground\nroad\nroof\n")
    return root


def test_train_and_val_folders_are_used_as_given(tmp_path, capsys):
    data = split_folder(tmp_path / "data", [(16, 16)] * 5, [(16, 16)] * 2)
    code, out, _ = run(capsys, "train", "--dataset", data, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert code == 0
    assert "5 train / 2 val images" in out and "as given" in out and "random" not in out
    meta = load_checkpoint(tmp_path / "run" / "last.npz")[0]
    assert meta["config"]["classes"] == ["ground", "road", "roof"]  # classes.txt next to train/ and val/
    # the same split given as two folders
    code, out, _ = run(capsys, "train", "--dataset", data / "train", "--val-dataset", data / "val", "--epochs", "1", "--out", tmp_path / "run2", *TINY)
    assert code == 0 and "5 train / 2 val images" in out
    # without a split the data is split at random, and the output says so
    code, out, _ = run(capsys, "train", "--dataset", data / "train", "--epochs", "1", "--out", tmp_path / "run3", *TINY)
    assert code == 0 and "4 train / 1 val images" in out and "random 80/20 split" in out
    code, _, err = run(capsys, "train", "--val-dataset", data / "val", "--out", tmp_path / "run4", *TINY)
    assert code == 2 and "--val-dataset needs --dataset to be a folder" in err


def test_large_images_train_with_crop_and_validate_by_windows(tmp_path, capsys):
    data = split_folder(tmp_path / "data", [(40, 56), (48, 40), (40, 40)], [(72, 60)])
    code, out, _ = run(capsys, "train", "--dataset", data, "--crop", "16", "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert code == 0 and "3 train / 1 val images" in out
    meta = load_checkpoint(tmp_path / "run" / "last.npz")[0]
    assert meta["config"]["tile"] == 16  # predict's default window
    code, out, _ = run(capsys, "eval", "--checkpoint", tmp_path / "run" / "last.npz", "--quiet", "--out", tmp_path / "eval")
    assert code == 0 and f"mIoU {100 * meta['history'][-1]['val_mIoU']:.2f}" in out
    assert Image.open(tmp_path / "eval" / "confusion.png").size[0] > 3 * 56


def test_eval_writes_a_confusion_matrix_and_per_image_iou_worst_first(tmp_path, capsys):
    data = split_folder(tmp_path / "data", [(16, 16)] * 4, [(16, 16)] * 3)
    code, _, _ = run(capsys, "train", "--dataset", data, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert code == 0
    code, out, _ = run(capsys, "eval", "--checkpoint", tmp_path / "run" / "last.npz", "--quiet")
    assert code == 0 and "worst images first" in out
    with open(tmp_path / "run" / "per_image_iou.csv") as f:  # default: next to the checkpoint
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and sorted(r["image"] for r in rows) == ["0.png", "1.png", "2.png"]
    mious = [float(r["mIoU"]) for r in rows]
    assert mious == sorted(mious)
    assert set(rows[0]) == {"rank", "image", "mIoU", "IoU ground", "IoU road", "IoU roof"}
    for r in rows:  # each image's mIoU is the mean of its defined class IoUs
        ious = [float(r[k]) for k in r if k.startswith("IoU ") and r[k]]
        assert float(r["mIoU"]) == pytest.approx(np.mean(ious), abs=1e-4)
    picture = np.asarray(Image.open(tmp_path / "run" / "confusion.png"))
    assert picture.shape[0] > 3 * 56 and (picture < 128).any()


def test_class_weights_auto_and_every_loss(tmp_path, capsys):
    data = split_folder(tmp_path / "data", [(16, 16)] * 4, [(16, 16)] * 2, values=(0, 0, 0, 0, 0, 1, 2))
    expected = median_frequency_weights(FolderDataset(data / "train"), 3)
    for loss in ("ce", "dice", "ce+dice", "focal"):
        out_dir = tmp_path / loss
        code, out, _ = run(capsys, "train", "--dataset", data, "--loss", loss, "--class-weights", "auto", "--epochs", "1", "--out", out_dir, *TINY)
        assert code == 0, loss
        assert f"loss {loss}" in out and "class weights (median-frequency balancing of the training masks)" in out
        meta = load_checkpoint(out_dir / "last.npz")[0]
        np.testing.assert_allclose(meta["config"]["weights"], expected, rtol=1e-5)
        assert np.isfinite(meta["history"][0]["train_loss"])
    assert expected[0] < 1 < expected[1]  # background is 5x as frequent as the other two classes
    code, _, err = run(capsys, "train", "--dataset", data, "--class-weights", "1,2", "--out", tmp_path / "bad", *TINY)
    assert code == 2 and "--class-weights needs 3 finite numbers" in err


def test_divergence_stops_with_a_message_and_keeps_finite_checkpoints(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "train", "--lr", "1e6", "--epochs", "2", "--out", tmp_path / "lr", *TINY)
    assert code == 3
    assert "training diverged in epoch 1" in err and "lower --lr" in err and "no checkpoint was written" in err
    assert not (tmp_path / "lr" / "last.npz").exists() and not (tmp_path / "lr" / "best.npz").exists()

    # a loss that turns NaN at the 2nd step of epoch 2 (steps 1-2 are epoch 1: 8 images, batch 4)
    real = cli.build_loss
    calls = []

    def nan_at_step_4(config, world=None):
        loss_fn = real(config, world)

        def wrapped(logits, masks):
            calls.append(1)
            loss = loss_fn(logits, masks)
            return loss * float("nan") if len(calls) == 4 else loss

        return wrapped

    monkeypatch.setattr(cli, "build_loss", nan_at_step_4)
    out = tmp_path / "nan"
    code, _, err = run(capsys, "train", "--epochs", "3", "--out", out, *TINY)
    assert code == 3 and "training diverged in epoch 2, step 2 of 2: the loss is not finite" in err
    assert "keeps epoch 1" in err
    meta, state, _ = load_checkpoint(out / "last.npz")
    assert meta["epoch"] == 1 and all(np.isfinite(v).all() for v in state.values())
    assert load_checkpoint(out / "best.npz")[0]["epoch"] == 1
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]


def test_divergence_in_a_replayed_step_stops_as_the_eager_step_does(tmp_path, capsys):
    """train --capture: the finiteness check runs in every replay, before the update (cli.captured_step)."""
    tiny = [*TINY, "--num-images", "40", "--epochs", "2", "--backend", "cpu", "--optimizer", "sgd", "--lr", "1e5"]
    errors = []
    for extra in ([], ["--capture"]):
        code, _, err = run(capsys, "train", *tiny, *extra, "--out", tmp_path / f"run{len(extra)}")
        errors.append(err)
        assert code == 3
    # step 7 of epoch 1 (10 steps of 4 images): the 4th replay of the captured run
    assert "training diverged in epoch 1, step 7 of 10: the loss is not finite (loss nan); the step was not taken" in errors[0]
    assert errors[1] == errors[0].replace("run0", "run1")


def test_deeplab_trains_and_predicts_large_images_by_windows(tmp_path, capsys):
    out = tmp_path / "run"
    code, text, _ = run(capsys, "train", "--model", "deeplab", "--epochs", "1", "--out", out, *TINY)
    assert code == 0 and "training deeplab" in text
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (75, 101, 3), dtype=np.uint8)).save(tmp_path / "big.png")  # > the 32-px tiles
    results = {}
    for name, extra in (("slide", []), ("gauss", ["--blend", "gaussian", "--tta", "flip", "--window-batch", "3"]), ("whole", ["--window", "0"])):
        code, _, _ = run(capsys, "predict", tmp_path / "big.png", "--checkpoint", out / "last.npz", "--out", tmp_path / name, "--probs", "--quiet", *extra)
        assert code == 0, name
        mask = np.asarray(Image.open(tmp_path / name / "big_mask.png"))
        probs = np.load(tmp_path / name / "big_probs.npy")
        assert mask.shape == (75, 101) and probs.shape == (4, 75, 101)
        assert Image.open(tmp_path / name / "big_overlay.png").size == (101, 75)
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
        np.testing.assert_array_equal(probs.argmax(0), mask)
        results[name] = probs
    # windows and one pass see the same pixels with different context: close, not equal
    assert np.abs(results["slide"] - results["whole"]).mean() < 0.1
    code, _, err = run(capsys, "predict", tmp_path / "big.png", "--checkpoint", out / "last.npz", "--overlap", "1", "--quiet")
    assert code == 2 and "--overlap must be in [0, 1)" in err
