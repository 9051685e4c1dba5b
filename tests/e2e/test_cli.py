"""The `minseg` command: train, eval, predict, info on tiny settings; resume; bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minseg.cli import load_checkpoint, main
from minseg.viz import mask_image

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--num-images", "8", "--val-images", "4", "--size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "4", "--quiet"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the eval/predict tests."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoints_and_report(trained, capsys):
    for name in ("last.npz", "best.npz", "history.json", "curves_loss.png", "curves_miou.png", "samples.png", "metrics.md"):
        assert (trained / name).is_file(), name
    assert not list(trained.glob("*.tmp"))  # the atomic write left no temporary file
    history = json.loads((trained / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_mIoU"] <= 1 for h in history)
    meta, model_state, optim_state = load_checkpoint(trained / "last.npz")
    assert meta["epoch"] == 2 and meta["config"]["model"] == "unet" and meta["config"]["num_classes"] == 4
    assert "head.weight" in model_state and optim_state["steps"] == 4  # 8 images / batch 4, 2 epochs
    assert "| building |" in (trained / "metrics.md").read_text()
    assert Image.open(trained / "samples.png").size[0] > 3 * 32


def test_train_capture_gives_the_same_weights_bit_for_bit(tmp_path, capsys):
    """``train --capture`` replays the recorded step (minseg/capture.py) from its third batch of each
    shape on: the same checkpoint, array for array, and the same losses as the eager run."""
    tiny = [*TINY, "--num-images", "24", "--epochs", "2", "--backend", "cpu", "--optimizer", "sgd"]  # 6 steps an epoch
    assert run(capsys, "train", *tiny, "--out", tmp_path / "eager")[0] == 0
    code, out, _ = run(capsys, "train", *tiny, "--capture", "--out", tmp_path / "captured")
    assert code == 0 and "--capture: 9 steps replayed\n" in out  # all but the first three (eager, eager, recorded)
    # AdamW, the default, updates with NumPy code: said, and run eagerly
    code, out, _ = run(capsys, "train", *TINY, "--epochs", "1", "--backend", "cpu", "--capture", "--out", tmp_path / "adamw")
    assert code == 0 and "--capture: the adamw update is NumPy code" in out and "steps replayed" not in out
    (meta_e, model_e, optim_e), (meta_c, model_c, optim_c) = (load_checkpoint(tmp_path / d / "last.npz") for d in ("eager", "captured"))
    assert model_e.keys() == model_c.keys() and all(np.array_equal(model_e[k], model_c[k]) for k in model_e)
    assert optim_e["steps"] == optim_c["steps"] == 12 and optim_e["lr"] == optim_c["lr"]
    for i, state in optim_e["state"].items():
        assert all(np.array_equal(v, optim_c["state"][i][k]) for k, v in state.items())
    for h_e, h_c in zip(meta_e["history"], meta_c["history"]):
        assert (h_e["train_loss"], h_e["val_loss"], h_e["val_mIoU"]) == (h_c["train_loss"], h_c["val_loss"], h_c["val_mIoU"])


def test_eval_prints_the_metrics_table(trained, capsys):
    code, out, _ = run(capsys, "eval", "--checkpoint", trained / "last.npz", "--quiet")
    assert code == 0
    for word in ("background", "building", "tree", "water", "IoU", "Dice", "Acc", "mIoU", "aAcc"):
        assert word in out
    history = json.loads((trained / "history.json").read_text())
    # eval recomputes the validation score that training reported for the same checkpoint
    assert f"mIoU {100 * history[-1]['val_mIoU']:.2f}" in out


def test_predict_writes_masks_overlays_and_probabilities(trained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("a.png", (37, 45)), ("b.jpg", (32, 32))):  # 37x45 is not a multiple of 2**depth
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    out = tmp_path / "pred"
    code, _, _ = run(capsys, "predict", *paths, "--checkpoint", trained / "best.npz", "--out", out, "--probs", "--boxes", "--quiet")
    assert code == 0
    mask = Image.open(out / "a_mask.png")
    assert mask.mode == "P" and mask.size == (45, 37)
    assert np.asarray(mask).max() < 4  # class ids as pixel values
    assert Image.open(out / "a_overlay.png").size == (45, 37)
    probs = np.load(out / "a_probs.npy")
    assert probs.shape == (4, 37, 45)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)  # softmax over classes, per pixel
    np.testing.assert_array_equal(probs.argmax(0), np.asarray(mask))
    assert (out / "b_prob_3_water.png").is_file()


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0 and "backends available" in out and "numpy" in out and "cuda:" in out


def test_python_dash_m_and_error_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "minseg", "eval", "--checkpoint", str(tmp_path / "missing.npz")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "checkpoint" in proc.stderr and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_after_kill_loses_no_finished_epoch(tmp_path, capsys):
    """Kill `train` (SIGKILL) once its first checkpoint exists; --resume must finish the run with
    exactly the weights of an uninterrupted run: no finished epoch lost, none repeated."""
    killed = tmp_path / "killed"
    args = [*TINY, "--num-images", "16", "--epochs", "3"]  # 4 steps per epoch: the kill lands mid-run
    proc = subprocess.Popen(
        [sys.executable, "-m", "minseg", "train", *args, "--out", str(killed)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed / "last.npz").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = load_checkpoint(killed / "last.npz")[0]
    finished = done_before["epoch"]
    assert 1 <= finished < 3, "the kill came too late to interrupt the run"
    code, out, _ = run(capsys, "train", "--out", killed, "--resume", "--quiet")
    assert code == 0
    meta, resumed, _ = load_checkpoint(killed / "last.npz")
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    assert meta["history"][:finished] == done_before["history"]  # finished epochs kept as they were

    straight = tmp_path / "straight"
    assert main(["train", *args, "--out", str(straight)]) == 0
    capsys.readouterr()
    _, reference, _ = load_checkpoint(straight / "last.npz")
    for name, value in reference.items():  # same seed, same batches per epoch, same optimizer state
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)

    code, out, _ = run(capsys, "train", "--out", killed, "--resume", "--quiet")
    assert code == 0 and "already holds all 3 epochs" in out


# -------------------------------------------------------------------- bad input


def folder(root, sizes=((16, 16),) * 4, values=(0, 1, 2)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        mask_image(rng.choice(values, (h, w))).save(root / "masks" / f"{i}.png")
    return root


def test_train_on_a_folder_reads_the_number_of_classes(tmp_path, capsys):
    data = folder(tmp_path / "data", sizes=((16, 16), (20, 18), (20, 18), (16, 16), (24, 16)), values=(0, 1, 2, 255))
    code, _, err = run(capsys, "train", "--dataset", data, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert code == 2 and "--crop" in err  # images of different sizes cannot be batched without a crop
    code, out, _ = run(capsys, "train", "--dataset", data, "--crop", "16", "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert code == 0 and "3 classes" in out
    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "run" / "last.npz", "--dataset", folder(tmp_path / "d5", values=(0, 4)))
    assert code == 2 and "holds value 4" in err and "predicts 3 classes" in err


def damage_size(root):
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(root / "masks" / "1.png")


def damage_value(root):
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(root / "masks" / "2.png")


def damage_png(root):
    (root / "images" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")


def damage_empty(root):
    for p in list((root / "images").iterdir()) + list((root / "masks").iterdir()):
        p.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (damage_size, "must match"),
        (damage_value, "holds value 9"),
        (damage_png, "cannot read image"),
        (damage_empty, "no .png/.jpg images"),
    ],
)
def test_bad_datasets_exit_2_with_a_message(tmp_path, capsys, damage, message):
    data = folder(tmp_path / "data")
    damage(data)
    code, _, err = run(capsys, "train", "--dataset", data, "--num-classes", "3", "--out", tmp_path / "run", *TINY)
    assert code == 2 and message in err and err.startswith("minseg: error:")


def test_bad_checkpoints_and_arguments(trained, tmp_path, capsys):
    ckpt = trained / "last.npz"
    cases = [
        (["eval", "--checkpoint", ckpt, "--model", "fcn"], "holds a unet with 4 classes, but --model fcn"),
        (["eval", "--checkpoint", ckpt, "--num-classes", "3"], "--num-classes 3"),
        (["predict", tmp_path / "nope.png", "--checkpoint", ckpt, "--out", tmp_path], "nope.png not found"),
        (["train", "--out", tmp_path / "fresh", "--resume"], "no checkpoint"),
        (["train", "--out", trained, "--resume", "--model", "fcn"], "model='unet'"),
        (["train", "--epochs", "0", "--out", tmp_path], "--epochs must be >= 1"),
        (["train", "--dataset", tmp_path / "nowhere", "--out", tmp_path], "neither 'synthetic'"),
    ]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases.append((["eval", "--checkpoint", tmp_path / "junk.npz"], "not a readable minseg checkpoint"))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")
    cases.append((["predict", tmp_path / "ok.png", "--checkpoint", tmp_path / "junk.npz", "--out", tmp_path], "not a readable"))
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
    with pytest.raises(SystemExit) as e:  # argparse's own errors: usage + exit 2
        main(["train", "--model", "segformer"])
    assert e.value.code == 2


def test_train_on_the_real_dataset(tmp_path, capsys):
    from minseg.data import DataError
    from minseg.data.real import sample_path

    try:
        sample_path()
    except DataError:
        pytest.skip("ndev-sampledata is not installed (pip install --no-deps ndev-sampledata)")
    code, out, _ = run(capsys, "train", "--dataset", "scratch-assay", *TINY, "--val-images", "8", "--epochs", "1", "--out", tmp_path)
    assert code == 0
    assert "on scratch-assay: 8 train / 8 val images, 3 classes" in out and "nucleus" in out


def test_resume_refuses_changed_hyperparameters(trained, capsys):
    # --resume continues the same run: a flag that differs from the checkpoint's config is an error
    for flag, value in (("--lr", "0.5"), ("--batch-size", "2"), ("--optimizer", "sgd")):
        code, _, err = run(capsys, "train", *TINY, "--resume", flag, value, "--out", trained)
        assert code == 2 and flag.lstrip("-").replace("-", "_") in err, err
    code, _, err = run(capsys, "train", *TINY, "--weight-decay", "-1", "--out", trained)
    assert code == 2 and "--weight-decay must be >= 0" in err
