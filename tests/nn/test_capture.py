"""minseg.capture: a recorded and replayed training step equals the eager step bit for bit.

Every test trains two copies of one model side by side, one eagerly and one through a
CapturedStep, on the same batches, and compares every parameter, buffer, optimizer buffer,
gradient and loss after every step -- exactly, since a replay makes the very same compiled
calls on the same values. The model is a small U-Net (BatchNorm, max-pool, bilinear up,
skip connections, cross-entropy): every kind of call a real step records.
"""
import numpy as np
import pytest

import minseg
import minseg.functional as F
from minseg import backend, capture
from minseg.capture import CapturedStep
from minseg.nn import UNet
from minseg.optim import SGD
from minseg.tensor import Tensor

N, C, H, CLASSES = 2, 3, 16, 3


def make(seed=0, lr=0.05):
    with backend.using("cpu"):
        minseg.manual_seed(seed)
        model = UNet(in_channels=C, num_classes=CLASSES, base_channels=4, depth=1)
        optimizer = SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    def step(x, target):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return model, optimizer, step


def batches(count, seed=1, n=N):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, C, H, H)).astype(np.float32), rng.integers(0, CLASSES, (n, H, H)).astype(np.int64))
            for _ in range(count)]


def state(model, optimizer, loss):
    out = {f"param {k}": np.array(p.data) for k, p in model.named_parameters()}
    out.update({f"grad {k}": np.array(p.grad.data) for k, p in model.named_parameters()})
    out.update({f"buffer {k}": np.array(b.data) for k, b in model.named_buffers()})
    out.update({f"optimizer {i} {k}": np.array(v) for i, s in optimizer.state.items() for k, v in s.items()})
    out["optimizer steps"] = np.array(optimizer.steps)
    out["loss"] = np.array(loss.data)
    return out


def assert_same(eager, captured, where):
    assert eager.keys() == captured.keys()
    differ = [k for k in eager if not np.array_equal(eager[k], captured[k], equal_nan=True)]
    assert not differ, f"{where}: captured differs from eager in {differ}"


def side_by_side(data, before_step=None):
    """Train an eager and a captured copy on ``data``; compare after every step; return the modes."""
    model_e, opt_e, step_e = make()
    model_c, opt_c, step_c = make()
    captured = CapturedStep(step_c, model_c, opt_c)
    modes = []
    with backend.using("cpu"):
        for i, (x, t) in enumerate(data):
            if before_step is not None:
                before_step(i, (model_e, opt_e), (model_c, opt_c))
            loss_e = step_e(Tensor(x.copy()), Tensor(t.copy()))
            loss_c = captured(x, t)
            modes.append(captured.mode)
            assert_same(state(model_e, opt_e, loss_e), state(model_c, opt_c, loss_c), f"step {i} ({captured.mode})")
    return modes, captured


def test_replayed_steps_equal_eager_steps_bit_for_bit():
    modes, captured = side_by_side(batches(7))
    assert modes == ["eager", "eager", "recording", "replay", "replay", "replay", "replay"]
    assert captured.reason is None and captured.replays == 4


def test_shared_memory_replays_equal_eager_steps(monkeypatch):
    """The tape's arrays share memory where their lifetimes do not overlap (_Tape.plan): this model's
    arrays are under the default size limit, so the limit is lowered to plan them."""
    monkeypatch.setattr(capture, "PLAN_MIN_BYTES", 1024)
    modes, captured = side_by_side(batches(6))
    assert modes[-1] == "replay" and captured.notes == []
    assert captured.tape.planned and captured.tape.saved_bytes > 0


def test_a_shared_block_that_loses_content_is_caught_and_the_tape_keeps_its_arrays(monkeypatch):
    """With no size limit, small float arrays a kernel function fills before its call (its constants)
    share memory too and lose their content: validation sees it, and the tape goes back to its own."""
    monkeypatch.setattr(capture, "PLAN_MIN_BYTES", 0)
    modes, captured = side_by_side(batches(7))
    assert modes == ["eager", "eager", "recording", "eager", "recording", "replay", "replay"]
    assert not captured.tape.planned and "shared memory differed" in captured.notes[0]


def test_numpy_work_between_the_kernels_is_caught_and_the_step_stays_eager():
    model, optimizer, _ = make()

    def step(x, target):  # the doubling is NumPy work no tape sees: a replay would reuse its first result
        optimizer.zero_grad()
        loss = F.cross_entropy(model(Tensor(x.data * 2)), target)
        loss.backward()
        optimizer.step()
        return loss

    model_e, opt_e, _ = make()

    def step_e(x, target):
        opt_e.zero_grad()
        loss = F.cross_entropy(model_e(Tensor(x.data * 2)), target)
        loss.backward()
        opt_e.step()
        return loss

    captured = CapturedStep(step, model, optimizer)
    with backend.using("cpu"):
        for i, (x, t) in enumerate(batches(5)):
            loss_e = step_e(Tensor(x), Tensor(t))
            loss_c = captured(x, t)
            assert_same(state(model_e, opt_e, loss_e), state(model, optimizer, loss_c), f"step {i}")
    assert captured.mode == "eager"
    assert "differed from the eager step" in captured.reason and "param" not in captured.reason
    assert "inc.0.weight" in captured.reason  # names what differed


def test_gradients_kept_from_the_step_before_are_caught_and_the_step_stays_eager():
    """A step without zero_grad adds into the kept gradients (NumPy, outside the kernels). Validation
    restores them before its replay, so the replay's stale sum shows (it once went unnoticed: the eager
    step of validation had already added into the very arrays the replay then read)."""
    def accumulating(model, optimizer):
        def step(x, target):
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            return loss
        return step

    model_e, opt_e, _ = make()
    model_c, opt_c, _ = make()
    step_e = accumulating(model_e, opt_e)
    captured = CapturedStep(accumulating(model_c, opt_c), model_c, opt_c)
    with backend.using("cpu"):
        for i, (x, t) in enumerate(batches(6)):
            loss_e = step_e(Tensor(x), Tensor(t))
            loss_c = captured(x, t)
            assert_same(state(model_e, opt_e, loss_e), state(model_c, opt_c, loss_c), f"step {i}")
    assert captured.mode == "eager" and "differed from the eager step" in captured.reason


def test_an_out_of_range_target_in_a_replay_raises_the_eager_error_and_leaves_the_eager_state():
    data = batches(5)
    bad_x, bad_t = batches(1, seed=9)[0]
    bad_t[1, 3, 4] = CLASSES + 2
    model_e, opt_e, step_e = make()
    model_c, opt_c, step_c = make()
    captured = CapturedStep(step_c, model_c, opt_c)
    with backend.using("cpu"):
        for x, t in data:
            step_e(Tensor(x), Tensor(t))
            captured(x, t)
        assert captured.mode == "replay"
        with pytest.raises(ValueError) as eager_error:
            step_e(Tensor(bad_x), Tensor(bad_t))
        with pytest.raises(ValueError) as replay_error:
            captured(bad_x, bad_t)
    assert str(replay_error.value) == str(eager_error.value)
    assert f"target value {CLASSES + 2} is out of range" in str(replay_error.value)
    # the forward ran in both (running statistics updated, batches counted), no optimizer step
    for (k, b_e), (_, b_c) in zip(model_e.named_buffers(), model_c.named_buffers()):
        assert np.array_equal(b_e.data, b_c.data), k
    assert opt_c.steps == opt_e.steps == len(data)


def test_a_learning_rate_schedule_is_followed_without_a_new_capture():
    """SGD hands its rate to the kernels in an array they read when they run (read_at_replay)."""
    def schedule(i, eager, captured):
        eager[1].lr = captured[1].lr = 0.05 * 0.8**i

    modes, _ = side_by_side(batches(8), schedule)
    assert modes == ["eager", "eager", "recording"] + ["replay"] * 5


def test_a_new_momentum_is_captured_again():
    def change(i, eager, captured):
        if i == 5:
            eager[1].momentum = captured[1].momentum = 0.5

    modes, _ = side_by_side(batches(9), change)
    assert modes[4:] == ["replay", "eager", "eager", "recording", "replay"]


def test_a_smaller_last_batch_runs_eagerly_and_the_full_batches_stay_captured():
    data = batches(5) + batches(1, seed=5, n=1) + batches(2, seed=6)
    modes, _ = side_by_side(data)
    assert modes == ["eager", "eager", "recording", "replay", "replay", "eager", "replay", "replay"]


def test_loading_a_checkpoint_captures_again():
    checkpoint = {}

    def reload(i, eager, captured):
        if i == 2:
            checkpoint["model"] = {k: np.array(v, copy=True) for k, v in eager[0].state_dict().items()}
            checkpoint["optimizer"] = eager[1].state_dict()
        if i == 5:  # both load the state of step 2: the captured step's arrays are replaced
            for model, optimizer in (eager, captured):
                with backend.using("cpu"):
                    model.load_state_dict(checkpoint["model"])
                optimizer.load_state_dict(checkpoint["optimizer"])

    modes, _ = side_by_side(batches(8), reload)
    assert modes[4] == "replay" and modes[5:8] == ["eager", "eager", "recording"]


def test_changing_a_module_captures_again():
    """A module setting the kernels get as an argument (BatchNorm's momentum); a module left in eval
    mode; but not an evaluation between steps (eval() then train()), which leaves the model as recorded."""
    def edit(i, eager, captured):
        for model, _ in (eager, captured):
            if i == 4:
                for m in model.modules():
                    if hasattr(m, "momentum"):
                        m.momentum = 0.5
            if i == 8:
                model.eval()
                model.train()
            if i == 9:
                model.inc.eval()  # its batch norms use the running statistics from now on

    modes, _ = side_by_side(batches(11), edit)
    assert modes[3:] == ["replay", "eager", "eager", "recording", "replay", "replay", "eager", "eager"]


def test_the_same_batch_again_is_not_enough_to_validate():
    x, t = batches(1)[0]
    data = [(x, t)] * 4 + batches(2, seed=3)
    modes, _ = side_by_side(data)
    assert modes == ["eager", "eager", "eager", "eager", "recording", "replay"]


def test_other_backends_run_the_step_eagerly():
    model, optimizer, step = make()
    captured = CapturedStep(step, model, optimizer)
    with backend.using("numpy"):
        model.load_state_dict(model.state_dict())  # the arrays stay NumPy arrays; the step's kernels are NumPy's
        for x, t in batches(4):
            captured(x, t)
            assert captured.mode == "eager"


def test_inputs_must_be_arrays_or_tensors():
    model, optimizer, step = make()
    captured = CapturedStep(step, model, optimizer)
    with backend.using("cpu"), pytest.raises(TypeError, match="CapturedStep: target must be a NumPy array or a cpu Tensor, got list"):
        captured(np.zeros((N, C, H, H), np.float32), [[0]])
