"""SGD, Adam, AdamW and the LR schedules against torch's, step by step on one small problem."""
import math

import numpy as np
import pytest

import minseg
from minseg import optim
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
