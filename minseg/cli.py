"""The ``minseg`` command: train, eval, predict, info, bench, tour.

    minseg train                       UNet on SyntheticScenes with the defaults below
    minseg train --dataset DIR         your images/ + masks/ folder (split 80/20 by a seeded shuffle), or a
                                       folder with train/ and val/ subfolders in that layout (used as given)
    minseg train --dataset DIR --val-dataset VALDIR   your own split, given as two folders
    minseg train --loss ce+dice --class-weights auto   losses for rare classes, median-frequency weights
    minseg train --dataset scratch-assay   the real microscopy tiles (pip install --no-deps ndev-sampledata)
    minseg eval --checkpoint runs/minseg/last.npz   (also writes confusion.png and per_image_iou.csv)
    minseg predict a.png b.jpg --checkpoint runs/minseg/best.npz --out preds --probs --boxes
                                       (sliding windows of the training tile size: any image size)
    minseg info                        versions, backends, GPU or simulator
    mpiexec -n 2 minseg train          data-parallel over 2 processes (minseg.distributed);
                                       --batch-size stays the global batch
    minseg bench ...                   forwards to ``python -m benchmarks ...``
    minseg tour                        a printed, checked walk through the engine (= python -m minseg.tour)

``train`` writes into ``--out``: ``last.npz`` (every epoch, atomically: a
temporary file renamed over the old one, so a kill never leaves a broken
checkpoint) and ``best.npz`` (best validation mIoU), ``history.json``, and a
report: ``curves_loss.png``, ``curves_miou.png``, ``samples.png`` (image |
truth | prediction for validation samples) and ``metrics.md`` (per-class table).
``--resume`` continues from ``last.npz``: finished epochs are kept, and since
every epoch's batches depend only on (seed, epoch) the run continues exactly
as if it had not stopped.

Bad input (a missing or corrupt file, mismatched sizes, invalid mask values,
a checkpoint of another model) ends with a one-line message on stderr and
exit code 2; set ``MINSEG_DEBUG=1`` to see the traceback instead. A run that
diverges (a non-finite loss or gradient in a step, or non-finite weights or
validation loss after an epoch) stops there with exit code 3 and a message
naming the epoch and step; the checkpoints keep the last finite epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REAL_DATASETS = ("scratch-assay",)
SYNTHETIC_TRAIN, SYNTHETIC_VAL = 320, 64
CHECKPOINT_FORMAT = "minseg-checkpoint-1"
MODEL_NAMES = ["unet", "fcn", "deeplab"]  # minseg.nn.MODELS, without importing it at start-up
LOSSES = ["ce", "dice", "ce+dice", "focal"]
FOCAL_GAMMA = 2.0  # Lin et al. 2017's best value on COCO

# Defaults of `minseg train`, chosen so that the run finishes within 3 minutes on
# 2 CPU cores with the cpu backend and reaches validation mIoU >= 0.85 on SyntheticScenes.
DEFAULTS = dict(
    model="unet",
    dataset="synthetic",
    epochs=8,
    batch_size=8,
    lr=3e-3,
    optimizer="adamw",
    weight_decay=1e-4,
    schedule="cosine",
    seed=0,
    size=64,
    num_images=None,  # synthetic: 320 scenes; other datasets: every training image
    val_images=None,  # synthetic: 64 scenes; other datasets: the whole validation split
    base_channels=16,
    depth=3,
    upsampling="bilinear",
    loss="ce",
    class_weights="none",
)


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class Diverged(Exception):
    """Training produced a non-finite loss, gradient or weight: exit code 3, checkpoints untouched."""


class Interrupted(Exception):
    """Ctrl-C during training: exit code 130 after saying where the last checkpoint is."""


# --------------------------------------------------------------------- data sets


def build_datasets(config: dict):
    """(train, val) datasets of a run's config; updates config with num_classes and class names."""
    from .data import FolderDataset, ScratchAssay, Subset, SyntheticScenes, random_split

    name = config["dataset"]
    if config.get("val_dataset") is not None and (name == "synthetic" or name in REAL_DATASETS):
        raise CLIError(f"--val-dataset needs --dataset to be a folder; dataset {name!r} comes with its own validation split")
    if name == "synthetic":
        n_train, n_val = config["num_images"] or SYNTHETIC_TRAIN, config["val_images"] or SYNTHETIC_VAL
        # One generator; validation scenes are the indices after the training ones, so they never overlap.
        scenes = SyntheticScenes(n_train + n_val, size=config["size"], seed=config["seed"])
        train, val = Subset(scenes, range(n_train)), Subset(scenes, range(n_train, n_train + n_val))
    elif name in REAL_DATASETS:
        train, val = ScratchAssay("train", tile=config["size"]), ScratchAssay("val", tile=config["size"])
    else:
        path = Path(name)
        if not path.exists():
            raise CLIError(f"--dataset {name!r} is neither 'synthetic', one of {list(REAL_DATASETS)}, nor an existing folder")
        val_path = config.get("val_dataset")
        if val_path is None and (path / "train").is_dir() and (path / "val").is_dir():
            path, val_path = path / "train", path / "val"  # the user's own split, used as given
        if val_path is not None:
            train, val = _folder_pair(path, Path(val_path), config.get("num_classes"))
            config["split"] = f"train {path}, val {val_path}, as given"
        else:
            full = FolderDataset(path, num_classes=config.get("num_classes"))
            train, val = random_split(full, val_fraction=0.2, seed=config["seed"])
            config["split"] = f"random 80/20 split of {path} (seed {config['seed']}; give train/ and val/ folders or --val-dataset to choose)"
    if name != "synthetic":
        train, val = _subset(train, config["num_images"], config["seed"]), _subset(val, config["val_images"], config["seed"])
    given = config.get("num_classes")
    if given is not None and given != train.num_classes:
        raise CLIError(f"{given} classes were asked for, but dataset {name!r} has {train.num_classes} classes")
    config["num_classes"] = train.num_classes
    config["classes"] = list(train.classes)
    return train, val


def _folder_pair(train_root: Path, val_root: Path, num_classes):
    """(train, val) FolderDatasets that agree on the number of classes (the larger of the two, unless given).

    Class names come from the training folder's classes.txt, else from one next
    to the train/ and val/ folders.
    """
    from .data import FolderDataset

    names = next((f for f in (train_root / "classes.txt", train_root.parent / "classes.txt") if f.is_file()), None)
    train = FolderDataset(train_root, num_classes=num_classes, classes_file=names)
    val = FolderDataset(val_root, num_classes=num_classes, classes_file=names)
    if train.num_classes != val.num_classes:  # a class may be missing from one split's masks
        n = max(train.num_classes, val.num_classes)
        train, val = (d if d.num_classes == n else FolderDataset(d.root, num_classes=n, classes_file=names) for d in (train, val))
    return train, val


def _subset(dataset, n, seed):
    """A seeded random subset of n items (all of them when n is None or too large)."""
    from .data import Subset

    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, sorted(np.random.default_rng(seed).permutation(len(dataset))[:n]))


def train_transform(config: dict):
    from .data import Compose, RandomCrop, RandomFlip

    steps = [RandomCrop(config["crop"])] if config.get("crop") else []
    return Compose(steps + [RandomFlip()])


def _uniform_size(dataset) -> bool:
    """Whether all samples share one size (datasets that know it say so; else every sample is read)."""
    known = getattr(dataset, "uniform_size", None)
    if known is not None:
        return known
    return len({dataset[i][1].shape for i in range(len(dataset))}) <= 1


# ---------------------------------------------------------------------- model


def build_model(config: dict):
    from .nn import build_model as build

    kwargs = dict(in_channels=3, num_classes=config["num_classes"], base_channels=config["base_channels"], depth=config["depth"])
    if config["model"] == "unet":
        kwargs["upsampling"] = config["upsampling"]
    return build(config["model"], **kwargs)


def build_loss(config: dict, world=None):
    """loss(logits, masks) of ``--loss``, with the run's class weights (``config['weights']``; None: all 1).

    Under mpiexec (``world.size > 1``) the cross-entropy divides each rank's summed pixel
    losses by the count (or class-weight sum) of the valid pixels of *all* ranks, so the
    averaged gradient is exactly the global batch's; Dice (a ratio of batch sums) and focal
    are not split that way yet and are refused there.
    """
    from . import distributed
    from . import functional as F
    from .tensor import tensor

    name = config.get("loss", "ce")  # checkpoints before --loss trained with ce
    if world is not None and world.size > 1 and name != "ce":
        raise CLIError(f"--loss {name} is not data-parallel exact yet: use --loss ce under mpiexec, or train {name} in one process")
    weight = None if config.get("weights") is None else tensor(np.asarray(config["weights"], np.float32))
    losses = {
        "ce": lambda logits, masks: distributed.cross_entropy(logits, masks, weight=weight, ignore_index=255, comm=world),
        "dice": lambda logits, masks: F.dice_loss(logits, masks, weight=weight, ignore_index=255),
        "focal": lambda logits, masks: F.focal_loss(logits, masks, alpha=weight, gamma=FOCAL_GAMMA, ignore_index=255),
    }
    terms = [losses[term] for term in name.split("+")]
    if len(terms) == 1:
        return terms[0]
    return lambda logits, masks: sum((term(logits, masks) for term in terms[1:]), terms[0](logits, masks))


def class_weights(config: dict, train_set) -> list | None:
    """The run's class weights: None ('none'), median-frequency balancing of the training masks ('auto'),
    or the comma-separated numbers given, one per class."""
    from .data import median_frequency_weights

    spec = config["class_weights"]
    if spec == "none":
        return None
    n = config["num_classes"]
    if spec == "auto":
        return [round(float(w), 6) for w in median_frequency_weights(train_set, n)]
    try:
        weights = [float(v) for v in spec.split(",")]
    except ValueError:
        raise CLIError(f"--class-weights must be 'none', 'auto' or {n} comma-separated numbers, got {spec!r}") from None
    if len(weights) != n or not all(np.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise CLIError(f"--class-weights needs {n} finite numbers >= 0 (one per class, not all 0), got {spec!r}")
    return weights


def build_optimizer(config: dict, model, steps_per_epoch: int):
    from . import optim

    params = model.parameters()
    name = config["optimizer"]
    if name == "sgd":
        opt = optim.SGD(params, lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"], nesterov=True)
    else:
        opt = optim.OPTIMIZERS[name](params, lr=config["lr"], weight_decay=config["weight_decay"])
    total = max(1, config["epochs"] * steps_per_epoch)
    schedule = optim.SCHEDULES[config["schedule"]](opt, total_steps=total)
    return opt, schedule


# ----------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, optimizer, schedule, meta: dict) -> None:
    """Weights, optimizer state and ``meta`` (epoch, config, history) in one .npz, written atomically.

    The file is written under a temporary name in the same folder, flushed to
    disk, then renamed over ``path`` (``os.replace`` is atomic), so ``path``
    always holds either the previous or the new complete checkpoint.
    """
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    scalars = {}
    for i, state in opt_state["state"].items():
        for k, v in state.items():
            if isinstance(v, np.ndarray):
                arrays[f"optim/{i}/{k}"] = v
            else:
                scalars.setdefault(str(i), {})[k] = v
    meta = dict(meta, format=CHECKPOINT_FORMAT, optim={"lr": opt_state["lr"], "steps": opt_state["steps"], "scalars": scalars})
    meta["schedule"] = schedule.state_dict()
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> tuple[dict, dict, dict]:
    """(meta, model state, optimizer state) of a checkpoint file; CLIError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"checkpoint {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as e:
        raise CLIError(f"{path} is not a readable minseg checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CLIError(f"{path} is not a minseg checkpoint (format {meta.get('format')!r})")
    model_state = {k[len("model/") :]: v for k, v in arrays.items() if k.startswith("model/")}
    state: dict = {}
    for k, v in arrays.items():
        if k.startswith("optim/"):
            _, i, name = k.split("/", 2)
            state.setdefault(int(i), {})[name] = v
    for i, s in meta["optim"]["scalars"].items():
        state.setdefault(int(i), {}).update(s)
    optim_state = {"lr": meta["optim"]["lr"], "steps": meta["optim"]["steps"], "state": state}
    return meta, model_state, optim_state


def model_from_checkpoint(path, args=None):
    """The model of a checkpoint, weights loaded; checks --model/--num-classes if the user gave them."""
    meta, state, _ = load_checkpoint(path)
    config = meta["config"]
    if args is not None:
        for key, flag in (("model", "--model"), ("num_classes", "--num-classes")):
            given = getattr(args, key, None)
            if given is not None and given != config[key]:
                raise CLIError(f"checkpoint {path} holds a {config['model']} with {config['num_classes']} classes, but {flag} {given} was given")
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise CLIError(f"checkpoint {path} does not fit a {config['model']} model: {e}") from None
    model.tile_size = config.get("tile") or config.get("crop") or config["size"]  # minseg.infer.predict's default window
    return model.eval(), meta


# ------------------------------------------------------------------ train loop


def _progress(iterable, desc: str, disable):
    """A tqdm bar on stderr (``disable=None``: shown only on a terminal)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr, disable=disable)


class _NonFinite(Exception):
    """A step's loss or a gradient is not finite (raised before the optimizer steps): (what, loss)."""


def _gradients(model) -> list:
    """[(name, gradient array)] of the parameters that have one."""
    return [(name, p.grad.data) for name, p in model.named_parameters() if p.grad is not None]


def _non_finite(loss, grads) -> str | None:
    """'loss' or 'gradient of NAME' for the first of the loss and ``grads`` [(name, array)] holding inf or
    NaN, else None (one sum per gradient: non-finite values survive it)."""
    if not np.isfinite(float(loss)):
        return "loss"
    return next((f"gradient of {name}" for name, g in grads if not np.isfinite(float(g.sum()))), None)


def _check_finite(loss, grads) -> None:
    bad = _non_finite(loss, grads)
    if bad:
        raise _NonFinite(bad, float(loss))


def _diverged(epoch: int, step: int, steps: int, bad: str, loss: float) -> Diverged:
    return Diverged(f"training diverged in epoch {epoch}, step {step} of {steps}: the {bad} is not finite "
                    f"(loss {loss:.4g}); the step was not taken")


def captured_step(model, optimizer, loss_fn):
    """``train_epoch``'s step (forward, loss, backward, the finiteness check, the update) as a
    :class:`minseg.capture.CapturedStep`: recorded once, then replayed (``train --capture``). The check
    runs in every replay too, before the update (``capture.on_replay``), so a non-finite step is never
    taken either way."""
    from .capture import CapturedStep, on_replay

    def step(x, target):
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        grads = _gradients(model)
        _check_finite(loss.data, grads)
        on_replay(lambda: _check_finite(loss.data, grads), reads=(loss.data, *(g for _, g in grads)))
        optimizer.step()
        return loss

    return CapturedStep(step, model, optimizer)


def train_epoch(model, loader, optimizer, schedule, desc: str = "", quiet: bool = False, loss_fn=None, epoch: int = 0,
                captured=None) -> float:
    """One pass over ``loader``: returns the mean training loss over the batches (of the global batch under mpiexec).

    ``loss_fn(logits, masks)`` defaults to the pixel-wise cross-entropy, normalised over
    all ranks' pixels (``distributed.cross_entropy``). A non-finite loss or gradient on
    any rank raises :class:`Diverged` on every rank before the optimizer steps, so the
    weights stay those of the last finite step. ``captured`` (one process only): the
    step as :func:`captured_step` made it, recorded once and replayed.
    """
    from . import distributed
    from .tensor import tensor

    model.train()
    total, count = 0.0, 0
    bar = _progress(loader, desc=desc, disable=quiet or None)
    for step, (images, masks) in enumerate(bar, 1):
        valid = distributed.count_valid(masks, 255)  # over all ranks' shares of the batch: every rank skips alike
        if not valid:
            continue  # nothing to learn from a fully ignored batch (its mean loss is 0/0)
        if captured is not None:
            try:
                loss = captured(images, masks)
            except _NonFinite as e:
                raise _diverged(epoch, step, len(loader), *e.args) from None
        else:
            logits = model(tensor(images))
            if loss_fn is None:
                loss = distributed.cross_entropy(logits, tensor(masks), ignore_index=255, valid=valid)
            else:
                loss = loss_fn(logits, tensor(masks))
            optimizer.zero_grad()
            loss.backward()
            bad = _non_finite(loss.item(), _gradients(model))
            if distributed.world().allreduce_object(int(bool(bad))):  # one rank's NaN stops every rank, in step
                raise _diverged(epoch, step, len(loader), bad or "loss or gradient of another rank", loss.item())
            optimizer.step()
        schedule.step()
        total += loss.item()
        count += 1
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{optimizer.lr:.2e}")
    total = distributed.world().allreduce_object(total) / distributed.world_size()  # the ranks' mean: the global batch's
    return total / max(count, 1)


def _non_finite_state(model) -> str | None:
    """The name of the first weight or buffer holding inf or NaN."""
    for name, value in model.state_dict().items():
        if np.asarray(value).dtype.kind == "f" and not np.isfinite(np.asarray(value)).all():
            return name
    return None


def evaluate(model, dataset, num_classes: int, batch_size: int = 16, keep: int = 0, quiet: bool = True, window=None,
             per_image=None, comm=None):
    """(scores, mean loss per pixel, first ``keep`` (image, truth, prediction) triples) on ``dataset``.

    With ``window``, images larger than it are segmented by sliding windows
    (:func:`minseg.infer.predict`), so memory stays bounded on large validation images.
    ``per_image``: a list that receives each image's confusion matrix, in dataset order.
    Over several ranks (``comm``, default: the world), each evaluates its own unpadded
    shard and the confusion matrices and loss totals are summed: the scores are those of
    the whole dataset; the samples are rank 0's (the first images).
    """
    from . import distributed
    from . import functional as F
    from .autograd import no_grad
    from .data import DataLoader, Subset
    from .infer import predict
    from .metrics import ConfusionMatrix, confusion_matrix
    from .tensor import tensor

    comm = comm or distributed.world()
    shard = np.arange(len(dataset))
    if comm.size > 1:
        shard = np.asarray(distributed.shard_indices(len(dataset), comm.size, comm.rank), dtype=np.int64)
        per_image_all = np.zeros((len(dataset), num_classes, num_classes), np.int64) if per_image is not None else None
        dataset = Subset(dataset, list(shard))
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=255)
    loader = DataLoader(dataset, batch_size if _uniform_size(dataset) else 1)
    loss_sum, pixels, samples = 0.0, 0, []
    with no_grad():
        for images, masks in _progress(loader, desc="eval", disable=quiet or None):
            if window and max(images.shape[2:]) > window:
                logits = tensor(np.stack([predict(model, im, window=window, progress=False) for im in images]))
            else:
                logits = model(tensor(images))
            valid = int((masks != 255).sum())
            if valid:
                loss_sum += F.cross_entropy(logits, tensor(masks), ignore_index=255, reduction="sum").item()
                pixels += valid
            pred = logits.argmax(1).numpy()
            cm.update(pred, masks)
            if per_image is not None:
                per_image.extend(confusion_matrix(p, m, num_classes, ignore_index=255) for p, m in zip(pred, masks))
            for k in range(min(keep - len(samples), len(images))):
                samples.append((images[k], masks[k], pred[k]))
    comm.allreduce_(cm.matrix)
    loss_sum, pixels = comm.allreduce_object(loss_sum), comm.allreduce_object(pixels)
    if per_image is not None and comm.size > 1:  # every rank's images, back in dataset order
        mine = per_image[-len(shard):] if len(shard) else []
        del per_image[len(per_image) - len(mine):]
        per_image_all[shard] = mine
        comm.allreduce_(per_image_all)
        per_image.extend(per_image_all)
    return cm.scores(), loss_sum / max(pixels, 1), samples


def write_report(out: Path, history: list, scores: dict, samples, classes, loss: str = "ce") -> None:
    from .metrics import format_table
    from .viz import plot_curves, prediction_grid, save_png

    plot_curves(
        out / "curves_loss.png",
        {"train loss": [h["train_loss"] for h in history], "val loss": [h["val_loss"] for h in history]},
        title="loss per pixel" + ("" if loss == "ce" else f" (train: {loss}, val: cross-entropy)"),
    )
    plot_curves(out / "curves_miou.png", {"val mIoU": [h["val_mIoU"] for h in history]}, title="validation mIoU")
    if samples:
        save_png(out / "samples.png", prediction_grid(*zip(*samples), classes=classes))
    epoch = history[-1]["epoch"] if history else 0
    (out / "metrics.md").write_text(
        f"# Validation metrics after epoch {epoch}\n\n{format_table(scores, classes, fmt='markdown')}"
    )


def _config_from_args(args) -> dict:
    config = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in DEFAULTS.items()}
    config["num_classes"] = args.num_classes
    config["crop"] = args.crop
    config["val_dataset"] = args.val_dataset
    config["backend"] = args.backend
    return config


def _join_world(args):
    """Under mpiexec, join the other ranks (minseg.distributed); only rank 0 prints."""
    from . import distributed

    world = distributed.init()
    if world.size > 1:
        distributed.share_cores()
        if world.rank != 0:
            sys.stdout, args.quiet = open(os.devnull, "w"), True
        print(f"data-parallel over {world.size} ranks ({world.name})")
    return world


def _first_compile_notice() -> None:
    """Say so when the cpu backend's kernels are not compiled yet: a first run waits for Numba (about a
    minute before training's first step on the 2-core machine: 57 s, 2026-11-28), with nothing else to show."""
    from . import backend

    if backend.get_backend() != "cpu":
        return
    from kernels import numba_cache

    if numba_cache.is_cold():
        print(f"first run of the cpu backend here: Numba compiles each kernel once for this machine (about a minute "
              f"for training on 2 cores) and caches it in {numba_cache.cache_location()} for later runs", flush=True)


def cmd_train(args) -> int:
    from . import backend, distributed
    from .data import DataLoader
    from .rng import manual_seed

    out = Path(args.out)
    last = out / "last.npz"
    history: list = []
    start_epoch = 1
    if args.resume:
        if not last.is_file():
            raise CLIError(f"--resume: no checkpoint {last} to resume from (train without --resume first)")
        meta, model_state, optim_state = load_checkpoint(last)
        config = meta["config"]
        for key in (*(k for k in DEFAULTS if k != "epochs"), "num_classes", "crop", "val_dataset"):
            given = getattr(args, key, None)
            if given is not None and given != config.get(key, DEFAULTS.get(key)):
                raise CLIError(f"--resume: the checkpoint in {out} was trained with {key}={config[key]!r}, but {given!r} was given")
        if args.epochs is not None:
            config["epochs"] = args.epochs
        if args.backend is not None:
            config["backend"] = args.backend
        history, start_epoch = meta["history"], meta["epoch"] + 1
    else:
        config = _config_from_args(args)
    backend.set_backend(config["backend"] or backend.get_backend())
    world = _join_world(args)
    if config["batch_size"] % world.size:
        raise CLIError(f"--batch-size {config['batch_size']} is the global batch; it must be divisible by the {world.size} ranks")
    manual_seed(config["seed"])

    train_set, val_set = build_datasets(config)
    transform = train_transform(config)
    if not config.get("crop") and not _uniform_size(train_set):
        raise CLIError("the training images differ in size, so they cannot be batched: give --crop SIZE")
    if not args.resume:
        config["tile"] = config["crop"] or list(train_set[0][1].shape)  # what predict's windows default to
        config["weights"] = class_weights(config, train_set)
    loss_fn = build_loss(config, world)
    sampler = distributed.DistributedSampler(train_set, seed=config["seed"]) if world.size > 1 else None
    loader = DataLoader(train_set, config["batch_size"] // world.size, shuffle=sampler is None, seed=config["seed"],
                        transform=transform, sampler=sampler)
    model = build_model(config)
    if world.size > 1 and not args.no_sync_bn:
        model = distributed.convert_sync_batchnorm(model)
    optimizer, schedule = build_optimizer(config, model, len(loader))
    if args.resume:
        try:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
            schedule.load_state_dict(meta["schedule"])
        except (KeyError, ValueError) as e:
            raise CLIError(f"--resume: checkpoint {last} does not fit the model: {e}") from None
        if start_epoch > config["epochs"]:
            print(f"{last} already holds all {config['epochs']} epochs; raise --epochs to train longer")
            return 0
        print(f"resuming from {last} after epoch {start_epoch - 1}")
    distributed.broadcast_parameters(model)  # every replica starts from rank 0's weights
    captured = None
    if args.capture:
        from .optim import SGD

        if world.size > 1 or backend.get_backend() != "cpu":
            print("--capture: only the cpu backend in one process is captured; the step runs eagerly here")
        elif not isinstance(optimizer, SGD):
            print(f"--capture: the {config['optimizer']} update is NumPy code, which a replay cannot repeat (SGD's is a "
                  "kernel: --optimizer sgd); the step runs eagerly")
        else:
            captured = captured_step(model, optimizer, loss_fn)
    optimizer = distributed.DistributedOptimizer(optimizer)  # step() averages the gradients first
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"training {config['model']} ({model.num_parameters():,} parameters) on {config['dataset']}: "
        f"{len(train_set)} train / {len(val_set)} val images, {config['num_classes']} classes, "
        f"backend {backend.get_backend()}, {config['epochs']} epochs, loss {config.get('loss', 'ce')}"
    )
    if config.get("split"):
        print(f"split: {config['split']}")
    _first_compile_notice()
    if config.get("weights") is not None:
        how = "median-frequency balancing of the training masks" if config["class_weights"] == "auto" else "given"
        listed = ", ".join(f"{c} {w:.3g}" for c, w in zip(config["classes"], config["weights"]))
        print(f"class weights ({how}): {listed}")
    best = max((h["val_mIoU"] for h in history), default=-1.0)
    epoch, t_start = start_epoch - 1, time.perf_counter()
    try:
        for epoch in range(start_epoch, config["epochs"] + 1):
            t0 = time.perf_counter()
            loader.set_epoch(epoch)
            desc = f"epoch {epoch}/{config['epochs']}"
            train_loss = train_epoch(model, loader, optimizer, schedule, desc=desc, quiet=args.quiet, loss_fn=loss_fn, epoch=epoch,
                                     captured=captured)
            scores, val_loss, samples = evaluate(model, val_set, config["num_classes"], keep=8, window=config.get("crop"))
            bad = "validation loss" if not np.isfinite(val_loss) else _non_finite_state(model)
            if bad:  # never let diverged weights overwrite a checkpoint
                raise Diverged(f"training diverged in epoch {epoch}: {bad} is not finite (validation loss {val_loss:.4g})")
            history.append(
                dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_mIoU=scores["mIoU"], val_aAcc=scores["aAcc"], seconds=time.perf_counter() - t0)
            )
            meta = dict(epoch=epoch, config=config, history=history)
            if world.rank == 0:
                save_checkpoint(last, model, optimizer, schedule, meta)
            if scores["mIoU"] > best:
                best = scores["mIoU"]
                if world.rank == 0:
                    save_checkpoint(out / "best.npz", model, optimizer, schedule, meta)
            world.barrier()  # the other ranks wait while rank 0 writes
            print(
                f"epoch {epoch}/{config['epochs']}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val mIoU {scores['mIoU']:.4f}  aAcc {scores['aAcc']:.4f}  ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during epoch {epoch}; {last} holds the finished epochs "
            f"(up to {epoch - 1}); continue with: minseg train --out {out} --resume"
        ) from None
    except Diverged as e:
        if world.rank == 0:
            (out / "history.json").write_text(json.dumps(history, indent=1))
        kept = f"{last} keeps epoch {history[-1]['epoch']}, the last finite one" if history else "no checkpoint was written"
        raise Diverged(f"{e}; {kept}. Try a lower --lr than {config['lr']:g} (e.g. {config['lr'] / 10:g})") from None
    if captured is not None:
        print(f"--capture: {captured.replays} steps replayed" + (f"; {captured.reason}" if captured.reason else ""))
    if world.rank != 0:
        return 0
    (out / "history.json").write_text(json.dumps(history, indent=1))
    if history and history[-1]["epoch"] == config["epochs"] and start_epoch <= config["epochs"]:
        write_report(out, history, scores, samples, config["classes"], config.get("loss", "ce"))
    from .metrics import format_table

    print(format_table(scores, config["classes"]))
    print(f"finished in {time.perf_counter() - t_start:.1f} s; val mIoU {scores['mIoU']:.4f}; checkpoints and report in {out}")
    return 0


# ----------------------------------------------------------------- eval, predict


def cmd_eval(args) -> int:
    from . import backend
    from .data import DataError
    from .metrics import format_table
    from .viz import confusion_matrix_image, save_png

    if args.backend:
        backend.set_backend(args.backend)
    world = _join_world(args)
    _first_compile_notice()
    model, meta = model_from_checkpoint(args.checkpoint, args)
    config = dict(meta["config"])
    if args.dataset is not None:
        config["dataset"], config["val_dataset"] = args.dataset, None
    expected = config["num_classes"]
    try:
        _, val_set = build_datasets(config)  # mask values are checked against the model's classes
    except (CLIError, DataError) as e:
        raise CLIError(f"{e} (the checkpoint's model predicts {expected} classes)") from None
    matrices: list = []
    scores, val_loss, _ = evaluate(model, val_set, expected, quiet=args.quiet, window=config.get("crop"), per_image=matrices)
    classes = meta["config"]["classes"]
    print(f"{args.checkpoint} (epoch {meta['epoch']}) on {config['dataset']} validation ({len(val_set)} images), loss {val_loss:.4f}")
    print(format_table(scores, classes, fmt="markdown" if args.markdown else "text"))
    if world.rank != 0:
        return 0
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    save_png(out / "confusion.png", confusion_matrix_image(sum(matrices), classes))
    write_per_image_iou(out / "per_image_iou.csv", matrices, [_item_name(val_set, i) for i in range(len(val_set))], classes)
    print(f"wrote {out / 'confusion.png'} (row-normalised confusion matrix) and {out / 'per_image_iou.csv'} (worst images first)")
    return 0


def _item_name(dataset, index: int) -> str:
    """A file name for a dataset item where there is one (FolderDataset, through Subsets), else '#index'."""
    while hasattr(dataset, "indices"):
        dataset, index = dataset.dataset, dataset.indices[index]
    pairs = getattr(dataset, "pairs", None)
    return pairs[index][0].name if pairs is not None else f"#{index}"


def write_per_image_iou(path: Path, matrices, names, classes) -> None:
    """One CSV row per image: rank, name, mIoU, IoU per class (empty where a class is in neither
    truth nor prediction), sorted by mIoU, worst first (images with no labelled pixel last)."""
    import csv

    from .metrics import scores as scores_of

    rows = []
    for name, m in zip(names, matrices):
        s = scores_of(m)
        rows.append((name, s["mIoU"], s["iou"]))
    rows.sort(key=lambda r: (np.isnan(r[1]), r[1]))

    def cell(v):
        return "" if np.isnan(v) else f"{v:.4f}"

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "image", "mIoU", *(f"IoU {c}" for c in classes)])
        for rank, (name, miou, iou) in enumerate(rows, 1):
            writer.writerow([rank, name, cell(miou), *(cell(v) for v in iou)])


def cmd_predict(args) -> int:
    from . import backend
    from .data import load_image
    from .infer import predict, softmax_inplace
    from .metrics import masks_to_boxes
    from .viz import draw_boxes, mask_image, overlay, save_png

    if args.backend:
        backend.set_backend(args.backend)
    _first_compile_notice()
    model, meta = model_from_checkpoint(args.checkpoint, args)
    classes = meta["config"]["classes"]
    paths = [Path(p) for p in args.images]
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise CLIError("two input images share a file name stem; their outputs would overwrite each other")
    for p in paths:
        if not p.is_file():
            raise CLIError(f"image {p} not found")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:  # one image in memory at a time
        image = load_image(path)
        window = image.shape[1:] if args.window == 0 else args.window  # 0: the whole image in one pass
        logits = predict(
            model, image, window=window, overlap=args.overlap, blend=args.blend, batch_size=args.window_batch,
            tta=args.tta, progress=False if args.quiet else None,
        )
        probs = softmax_inplace(logits)
        pred = probs.argmax(0)
        mask_image(pred).save(out / f"{path.stem}_mask.png")
        over = overlay(image, pred)
        if args.boxes:
            boxes, labels, _ = masks_to_boxes(pred, classes=[c for c in range(len(classes)) if c != 0])
            over = draw_boxes(over, boxes, labels)
        save_png(out / f"{path.stem}_overlay.png", over)
        if args.probs:
            np.save(out / f"{path.stem}_probs.npy", probs)
            for c, name in enumerate(classes):
                save_png(out / f"{path.stem}_prob_{c}_{name}.png", np.rint(probs[c] * 255).astype(np.uint8))
    print(f"wrote predictions for {len(paths)} image(s) to {out}")
    return 0


# ------------------------------------------------------------------ info, bench


def cmd_info(args) -> int:
    from . import __version__, backend

    def version(module):
        try:
            return __import__(module).__version__
        except Exception:
            return "not installed"

    print(f"minseg {__version__}")
    print(f"python {platform.python_version()} ({platform.platform()})")
    for module in ("numpy", "numba", "PIL", "tqdm", "cupy", "torch"):
        print(f"{'pillow' if module == 'PIL' else module:<8} {version(module)}")
    print(f"cpu cores: {os.cpu_count()}")
    print(f"backends available: {', '.join(backend.available_backends()) or 'none'}")
    print(f"default backend: {backend.default_backend()}")
    status = backend.cuda_status()
    print(f"cuda: {'real GPU' if status == 'gpu' else 'CUDA simulator (NUMBA_ENABLE_CUDASIM=1)' if status == 'simulator' else status}")
    return 0


def cmd_bench(args) -> int:
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.bench_args])


def cmd_tour(args) -> int:
    from .tour import run

    return run(args.out)


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minseg", description="Semantic segmentation from scratch on NumPy and Numba.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,info,bench,tour}")

    def common(p):
        p.add_argument("--backend", choices=["numpy", "cpu", "cuda"], default=None, help="kernel set (default: the fastest available)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("train", help="train a model; writes checkpoints and a report to --out")
    common(t)
    t.add_argument("--model", choices=MODEL_NAMES, default=None, help="default: unet")
    t.add_argument("--dataset", default=None, help="'synthetic' (default), a folder with images/ and masks/, or 'scratch-assay'")
    t.add_argument("--epochs", type=int, default=None, help=f"default: {DEFAULTS['epochs']}")
    t.add_argument("--batch-size", type=int, default=None, help=f"default: {DEFAULTS['batch_size']}")
    t.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {DEFAULTS['lr']})")
    t.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=None, help=f"default: {DEFAULTS['optimizer']}")
    t.add_argument("--weight-decay", type=float, default=None, help=f"default: {DEFAULTS['weight_decay']}")
    t.add_argument("--schedule", choices=["cosine", "poly"], default=None, help=f"learning-rate schedule (default: {DEFAULTS['schedule']})")
    t.add_argument("--seed", type=int, default=None, help="seeds data order, augmentation and initialisation (default: 0)")
    t.add_argument("--out", default="runs/minseg", help="output folder (default: runs/minseg)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.npz")
    t.add_argument("--num-classes", type=int, default=None, help="number of classes (default: read from the masks)")
    t.add_argument("--size", type=int, default=None, help=f"synthetic scene / real tile size in pixels (default: {DEFAULTS['size']})")
    t.add_argument("--num-images", type=int, default=None, help=f"training images: synthetic scenes to generate (default: {SYNTHETIC_TRAIN}), or a seeded subset of another dataset (default: all)")
    t.add_argument("--val-images", type=int, default=None, help=f"validation images, likewise (default: {SYNTHETIC_VAL} synthetic scenes, or all)")
    t.add_argument("--crop", type=int, default=None, help="random training crops of this size (needed when folder images differ in size)")
    t.add_argument("--base-channels", type=int, default=None, help=f"width of the first stage (default: {DEFAULTS['base_channels']})")
    t.add_argument("--depth", type=int, default=None, help=f"number of down-sampling stages (default: {DEFAULTS['depth']})")
    t.add_argument("--upsampling", choices=["bilinear", "transpose"], default=None, help="UNet decoder upsampling (default: bilinear)")
    t.add_argument("--no-sync-bn", action="store_true", help="under mpiexec: each rank's batch norm uses its own shard's statistics")
    t.add_argument("--capture", action="store_true", help="record the training step once and replay its compiled calls "
                   "without the Python between them (cpu backend, one process, --optimizer sgd; the same weights bit "
                   "for bit: minseg/capture.py)")
    t.add_argument("--val-dataset", default=None, help="a folder with images/ and masks/ to validate on (default: DATASET/val if there is one, else a random 20%% of DATASET)")
    t.add_argument("--loss", choices=LOSSES, default=None, help="cross-entropy, soft Dice, their sum, or focal (gamma 2) (default: ce)")
    t.add_argument("--class-weights", default=None, help="'none' (default), 'auto' (median-frequency balancing of the training masks) or one comma-separated number per class")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="metrics of a checkpoint on its validation data")
    common(e)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", default=None, help="evaluate on another dataset (default: the checkpoint's)")
    e.add_argument("--model", choices=MODEL_NAMES, default=None, help="expected model (checked against the checkpoint)")
    e.add_argument("--num-classes", type=int, default=None, help="expected number of classes (checked)")
    e.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    e.add_argument("--out", default=None, help="folder for confusion.png and per_image_iou.csv (default: the checkpoint's folder)")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="masks, overlays and probabilities for images")
    common(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--probs", action="store_true", help="also write the per-class probability maps (.npy and one PNG per class)")
    p.add_argument("--boxes", action="store_true", help="draw a box around each connected region on the overlay")
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="expected model (checked against the checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, help="expected number of classes (checked)")
    p.add_argument("--window", type=int, default=None, help="sliding-window size in pixels (default: the training tile size; 0: the whole image in one pass)")
    p.add_argument("--overlap", type=float, default=0.25, help="fraction of a window shared with its neighbour, in [0, 1) (default: 0.25)")
    p.add_argument("--blend", choices=["mean", "gaussian"], default="mean", help="how overlapping windows' logits are averaged (default: mean)")
    p.add_argument("--window-batch", type=int, default=8, help="windows per forward pass; peak memory grows with it (default: 8)")
    p.add_argument("--tta", choices=["flip"], default=None, help="test-time augmentation: average the predictions of the flipped images")
    p.set_defaults(func=cmd_predict)

    i = sub.add_parser("info", help="versions, backends, GPU or simulator")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="run the benchmarks (python -m benchmarks ...)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("tour", help="a printed, checked walk through the engine (python -m minseg.tour)")
    r.add_argument("--out", default=None, help="folder for the autograd graph's .dot/.png (default: a new temporary folder)")
    r.set_defaults(func=cmd_tour)
    return parser


def _check_ranges(args):
    for name in ("epochs", "batch_size", "num_images", "val_images", "size", "crop", "base_channels", "depth", "num_classes"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    lr = getattr(args, "lr", None)
    if lr is not None and not lr > 0:
        raise CLIError(f"--lr must be > 0, got {lr}")
    if getattr(args, "window", None) is not None and args.window < 0:
        raise CLIError(f"--window must be >= 0 (0: the whole image in one pass), got {args.window}")
    if getattr(args, "window_batch", 1) < 1:
        raise CLIError(f"--window-batch must be >= 1, got {args.window_batch}")
    overlap = getattr(args, "overlap", 0.0)
    if not 0 <= overlap < 1:
        raise CLIError(f"--overlap must be in [0, 1), got {overlap}")
    weight_decay = getattr(args, "weight_decay", None)
    if weight_decay is not None and not weight_decay >= 0:
        raise CLIError(f"--weight-decay must be >= 0, got {weight_decay}")


def main(argv=None) -> int:
    from . import distributed

    code = _run(argv)
    if code:
        distributed.fail(code)  # the other ranks may be waiting in a collective: end them too
    return code


def _run(argv) -> int:
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        _check_ranges(args)
        return args.func(args)
    except Interrupted as e:
        print(f"minseg: {e}", file=sys.stderr)
        return 130
    except Diverged as e:
        print(f"minseg: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("minseg: interrupted", file=sys.stderr)
        return 130
    except (CLIError, DataError, OSError) as e:
        if os.environ.get("MINSEG_DEBUG"):
            raise
        print(f"minseg: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for the user; MINSEG_DEBUG=1 shows it
        if os.environ.get("MINSEG_DEBUG"):
            raise
        print(f"minseg: error: {type(e).__name__}: {e} (set MINSEG_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
