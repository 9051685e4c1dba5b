"""SGD, Adam, AdamW and the LR schedules against torch's, step by step on one small problem."""
import math

import numpy as np
import pytest

import minseg
from minseg import backend, optim
from minseg.nn import Parameter
from tests.helpers import assert_close, torch_or_skip

STEPS = 25


def problem(seed=0):
    """Least squares with an L1-ish twist: loss = mean((X W + b - Y)^2) + mean(W^3) (non-quadratic, so momentum matters)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, 3)), rng.standard_normal((8, 2)), rng.standard_normal((3, 2)), rng.standard_normal(2)


def without_gradient(step, missing):
    """Which parameter gets no gradient at ``step`` when ``missing``: b on steps 1, 5, 9, ..., W on 3, 8, 13, ...

    A parameter left out of the loss keeps ``grad is None`` after zero_grad, and torch's optimizers
    skip it: no update, no weight decay, its momentum and Adam moments untouched, and its own Adam
    step count t not advanced -- so W and b reach different t, which a global count gets wrong.
    """
    if missing and step % 4 == 1:
        return "b"
    if missing and step % 5 == 3:
        return "w"
    return None


def minseg_trajectory(make_opt, schedule=None, missing=False):
    x, y, w0, b0 = problem()
    w, b = Parameter(w0.copy()), Parameter(b0.copy())
    opt = make_opt([w, b])
    sched = schedule(opt) if schedule else None
    out = []
    for step in range(STEPS):
        skip = without_gradient(step, missing)
        pred = minseg.tensor(x) @ w if skip == "b" else minseg.tensor(x) @ w0 + b if skip == "w" else minseg.tensor(x) @ w + b
        loss = ((pred - minseg.tensor(y)) ** 2).mean() + (0 if skip == "w" else (w * w * w).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        out.append((w.numpy().copy(), b.numpy().copy(), opt.lr))
    return out


def torch_trajectory(torch, make_opt, schedule=None, missing=False):
    x, y, w0, b0 = (torch.tensor(a) for a in problem())
    w, b = torch.tensor(w0.numpy(), requires_grad=True), torch.tensor(b0.numpy(), requires_grad=True)
    opt = make_opt([w, b])
    sched = schedule(opt) if schedule else None
    out = []
    for step in range(STEPS):
        skip = without_gradient(step, missing)
        pred = x @ w if skip == "b" else x @ w0 + b if skip == "w" else x @ w + b
        loss = ((pred - y) ** 2).mean() + (0 if skip == "w" else (w**3).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        out.append((w.detach().numpy().copy(), b.detach().numpy().copy(), opt.param_groups[0]["lr"]))
    return out


CASES = {
    "sgd": (lambda p: optim.SGD(p, lr=0.05), "SGD", dict(lr=0.05)),
    "sgd_momentum_wd": (lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1), "SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
    "sgd_dampening": (lambda p: optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3), "SGD", dict(lr=0.05, momentum=0.8, dampening=0.3)),
    "sgd_nesterov": (
        lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
        "SGD",
        dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
    ),
    "adam": (lambda p: optim.Adam(p, lr=0.02), "Adam", dict(lr=0.02)),
    "adam_wd_betas": (
        lambda p: optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        "Adam",
        dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    ),
    "adamw": (lambda p: optim.AdamW(p, lr=0.02), "AdamW", dict(lr=0.02)),
    "adamw_wd": (lambda p: optim.AdamW(p, lr=0.02, weight_decay=0.5), "AdamW", dict(lr=0.02, weight_decay=0.5)),
}


@pytest.mark.parametrize("missing", [False, True], ids=["every-grad", "some-grads-missing"])
@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_trajectory_matches_torch(case, missing):
    torch = torch_or_skip()
    ours, torch_name, kwargs = CASES[case]
    got = minseg_trajectory(ours, missing=missing)
    want = torch_trajectory(torch, lambda p: getattr(torch.optim, torch_name)(p, **kwargs), missing=missing)
    # float64 on both sides, same formulas: only summation order differs (~1e-15 per step),
    # amplified a little over 25 steps; 1e-10 is far below any real semantic difference.
    for step, ((w, b, _), (tw, tb, _)) in enumerate(zip(got, want)):
        assert_close(w, tw, rtol=1e-10, atol=1e-12, name=f"{case} W after step {step + 1}")
        assert_close(b, tb, rtol=1e-10, atol=1e-12, name=f"{case} b after step {step + 1}")


@pytest.mark.parametrize("name", ["cosine", "poly"])
def test_schedule_matches_torch(name):
    torch = torch_or_skip()
    total = 10  # shorter than STEPS: the lr must stay at its final value afterwards
    ours = (
        (lambda o: optim.CosineLR(o, total, min_lr=0.01))
        if name == "cosine"
        else (lambda o: optim.PolyLR(o, total, power=0.9))
    )
    theirs = (
        (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=0.01))
        if name == "cosine"
        else (lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=total, power=0.9))
    )
    got = minseg_trajectory(lambda p: optim.SGD(p, lr=0.1, momentum=0.9), ours)
    want = torch_trajectory(torch, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), theirs)
    got_lr = [lr for *_, lr in got][: total]
    want_lr = [lr for *_, lr in want][: total]
    # torch's CosineAnnealingLR is a recursion equal to the closed form up to round-off.
    np.testing.assert_allclose(got_lr, want_lr, rtol=1e-9, atol=1e-12)
    for step, ((w, _, _), (tw, _, _)) in enumerate(zip(got[:total], want[:total])):
        assert_close(w, tw, rtol=1e-9, atol=1e-12, name=f"{name}: W after step {step + 1}")


def test_schedule_shapes_without_torch():
    opt = optim.SGD([Parameter(np.zeros(1))], lr=1.0)
    cos = optim.CosineLR(opt, total_steps=4, warmup_steps=2)
    lrs = [opt.lr]
    for _ in range(7):
        cos.step()
        lrs.append(opt.lr)
    # linear warm-up 0.5, 1.0; then cosine over the 2 remaining steps: 1, 0.5, 0; then stays at 0
    np.testing.assert_allclose(lrs, [0.5, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0], atol=1e-12)
    opt.lr = 2.0
    poly = optim.PolyLR(opt, total_steps=4, power=1.0)
    assert opt.lr == 2.0
    poly.step()
    assert math.isclose(opt.lr, 1.5)


@pytest.mark.parametrize("case", ["sgd_nesterov", "adamw_wd"])
def test_state_dict_resume_continues_the_same_trajectory(case):
    ours = CASES[case][0]
    full = minseg_trajectory(ours)
    x, y, w0, b0 = problem()

    def run(w, b, opt, steps):
        for _ in range(steps):
            loss = ((minseg.tensor(x) @ w + b - minseg.tensor(y)) ** 2).mean() + (w * w * w).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    w, b = Parameter(w0.copy()), Parameter(b0.copy())
    opt = ours([w, b])
    run(w, b, opt, 10)
    state = opt.state_dict()
    w2, b2 = Parameter(w.numpy().copy()), Parameter(b.numpy().copy())
    opt2 = ours([w2, b2])
    opt2.load_state_dict(state)
    run(w2, b2, opt2, STEPS - 10)
    assert_close(w2.numpy(), full[-1][0], rtol=0, atol=0, name="resumed W")  # identical arithmetic


def test_bad_hyperparameters_raise():
    p = [Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        optim.SGD(p, lr=-1)


# --------------------------------------------------------- SGD through the sgd_steps kernels


def spy_on_sgd_steps(monkeypatch, backend_name):
    """Record the arguments of every ``sgd_steps`` call of backend ``backend_name`` (and still run it)."""
    kernels = backend.load(backend_name)
    real, calls = kernels.functions["sgd_steps"], []

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setitem(kernels.functions, "sgd_steps", spy)
    return calls


@pytest.mark.parametrize("backend_name", ["numpy", "cpu", "cuda"])
def test_sgd_steps_with_the_active_backends_kernel(monkeypatch, backend_name):
    calls = spy_on_sgd_steps(monkeypatch, backend_name)
    p = Parameter(np.ones((2, 3), np.float32))
    opt = optim.SGD([p], lr=0.5, momentum=0.9)
    p.grad = minseg.Tensor(np.ones((2, 3), np.float32))
    with backend.using(backend_name):
        opt.step()
        opt.step()
    assert len(calls) == 2 and calls[0][0][0] is p.data and calls[0][2][0] is opt.state[0]["momentum_buffer"]
    assert [c[-1] for c in calls] == [True, False]  # first_step: the kernel writes b = g, then mixes
    # b = g = 1, then 0.9 + 1 = 1.9; p = 1 - 0.5 - 0.95
    assert_close(p.data, np.full((2, 3), -0.45, np.float32), rtol=1e-6, atol=1e-7, name="p after two steps")


def test_sgd_without_momentum_keeps_no_buffer(monkeypatch):
    calls = spy_on_sgd_steps(monkeypatch, "cpu")
    ps = [Parameter(np.ones(3)), Parameter(np.ones((2, 2)))]
    opt = optim.SGD(ps, lr=0.1, weight_decay=0.1)
    with backend.using("cpu"):
        for _ in range(3):
            for p in ps:
                p.grad = minseg.Tensor(np.ones(p.shape))
            opt.step()
    # one call per step for both parameters; momentum 0: the kernel gets no buffer
    assert len(calls) == 3 and all([q is p.data for q, p in zip(c[0], ps)] == [True, True] for c in calls)
    assert all(c[2] == [None, None] for c in calls)
    assert opt.state == {0: {}, 1: {}} and opt.state_dict()["state"] == {0: {}, 1: {}}


def test_numpy_parameters_step_on_the_cpu_kernels_while_a_gpu_backend_is_active(monkeypatch):
    """With the cuda backend of a real GPU active (its arrays are CuPy's), a model left in host memory
    cannot use its kernels: the cpu kernels update it. Here the cuda backend pretends to compute on
    another array module."""
    cuda_calls, cpu_calls = spy_on_sgd_steps(monkeypatch, "cuda"), spy_on_sgd_steps(monkeypatch, "cpu")
    monkeypatch.setattr(backend.load("cuda"), "xp", object())
    p = Parameter(np.ones(4))
    p.grad = minseg.Tensor(np.full(4, 2.0))
    with backend.using("cuda"):
        optim.SGD([p], lr=0.25).step()
    assert not cuda_calls and len(cpu_calls) == 1
    np.testing.assert_array_equal(p.data, np.full(4, 0.5))


def test_sgd_rejects_what_the_kernels_cannot_update_in_place():
    p = Parameter(np.ones((3, 2)).T)  # a transposed view: not C-contiguous
    p.grad = minseg.Tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"parameter of shape \(2, 3\) is not C-contiguous"):
        optim.SGD([p], lr=0.1).step()
    q = Parameter(np.ones((2, 3)))
    q.grad = minseg.Tensor(np.ones(6))
    with pytest.raises(ValueError, match=r"shape \(2, 3\) has a gradient of shape \(6,\)"):
        optim.SGD([q], lr=0.1).step()


def test_loaded_momentum_buffers_take_the_parameters_dtype_and_layout():
    """A checkpoint's buffer in another dtype or layout is converted once, on load (torch casts state to
    its parameter too), and the next step continues from it."""
    p = Parameter(np.zeros((2, 3), np.float32))
    opt = optim.SGD([p], lr=1.0, momentum=0.5)
    opt.load_state_dict({"lr": 1.0, "steps": 1, "state": {0: {"momentum_buffer": np.ones((3, 2)).T}}})
    buf = opt.state[0]["momentum_buffer"]
    assert buf.dtype == np.float32 and buf.flags.c_contiguous
    p.grad = minseg.Tensor(np.ones((2, 3), np.float32))
    opt.step()  # b = 0.5 * 1 + 1 = 1.5, p = 0 - 1.5
    np.testing.assert_array_equal(p.data, np.full((2, 3), -1.5, np.float32))
    assert opt.state[0]["momentum_buffer"] is buf  # updated in place


def test_a_loaded_state_dict_stays_the_callers():
    """Loading copies the buffers: the steps of one optimizer change neither the dict it was loaded
    from nor another optimizer loaded from the same dict (they had shared one buffer)."""
    state = {"lr": 1.0, "steps": 1, "state": {0: {"momentum_buffer": np.ones((2, 3), np.float32)}}}
    params = [Parameter(np.zeros((2, 3), np.float32)) for _ in range(2)]
    opts = [optim.SGD([p], lr=1.0, momentum=0.5) for p in params]
    for opt in opts:
        opt.load_state_dict(state)
    params[0].grad = minseg.Tensor(np.ones((2, 3), np.float32))
    opts[0].step()  # b = 0.5 * 1 + 1 = 1.5 in the first optimizer only
    np.testing.assert_array_equal(opts[0].state[0]["momentum_buffer"], np.full((2, 3), 1.5, np.float32))
    np.testing.assert_array_equal(opts[1].state[0]["momentum_buffer"], np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(state["state"][0]["momentum_buffer"], np.ones((2, 3), np.float32))


def test_sgd_groups_parameters_by_kernels_and_first_step(monkeypatch):
    """A parameter added to the optimizer's list later (its buffer new) steps in a call of its own, with
    first_step; parameters without a gradient are left out."""
    calls = spy_on_sgd_steps(monkeypatch, "cpu")
    ps = [Parameter(np.ones(3, np.float32)) for _ in range(3)]
    opt = optim.SGD(ps[:2], lr=0.5, momentum=0.9)
    with backend.using("cpu"):
        for p in ps:
            p.grad = minseg.Tensor(np.ones(3, np.float32))
        opt.step()
        opt.params.append(ps[2])
        ps[0].grad = None
        opt.step()
    assert [(len(c[0]), c[-1]) for c in calls] == [(2, True), (1, False), (1, True)]
    assert calls[1][0][0] is ps[1].data and calls[2][0][0] is ps[2].data
    np.testing.assert_array_equal(ps[0].data, np.full(3, 0.5, np.float32))  # one step: 1 - 0.5
