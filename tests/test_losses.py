"""nll_loss, dice_loss and focal_loss: torch as the oracle where torch has the loss
(nll_loss), cross_entropy == nll_loss(log_softmax), gradcheck, values computed by
hand on small maps, and invariants (perfect prediction -> Dice 0, focal with
gamma 0 == cross-entropy, focal <= cross-entropy)."""
import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import cross_entropy, dice_loss, focal_loss, log_softmax, nll_loss
from tests.helpers import assert_close, tol, torch_or_skip

T = minseg.Tensor


@pytest.fixture(autouse=True)
def numpy_backend():
    with backend.using("numpy"):
        yield


@st.composite
def loss_cases(draw, max_c=5):
    """(logits, target, weight, ignore_index, reduction): (N, C) or (N, C, H, W), some pixels ignored."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, max_c))
    spatial = draw(st.sampled_from([(), (1, 1), (2, 3), (3, 1)]))
    ignore_index = draw(st.sampled_from([-100, 255, 0]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((n, c) + spatial) * draw(st.sampled_from([1.0, 4.0]))
    target = rng.integers(0, c, (n,) + spatial)
    target[rng.random(target.shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore_index
    weight = rng.uniform(0.2, 2.0, c) if draw(st.booleans()) else None
    return x, target, weight, ignore_index, reduction


def _t(a):
    return None if a is None else T(a)


# ------------------------------------------------------------------------- nll_loss


@settings(max_examples=30)
@given(case=loss_cases(), dtype=st.sampled_from([np.float32, np.float64]))
def test_nll_loss_matches_torch(case, dtype):
    torch = torch_or_skip()
    x, target, weight, ignore_index, reduction = case
    logp = log_softmax(T(x), 1).numpy().astype(dtype)
    w = None if weight is None else weight.astype(dtype)
    g = np.random.default_rng(0).standard_normal(target.shape if reduction == "none" else ()).astype(dtype)
    ours_in = T(logp, requires_grad=True)
    ours = nll_loss(ours_in, T(target), _t(w), ignore_index=ignore_index, reduction=reduction)
    ours.backward(T(g))
    theirs_in = torch.tensor(logp, requires_grad=True)
    theirs = torch.nn.functional.nll_loss(
        theirs_in, torch.tensor(target), None if w is None else torch.tensor(w), ignore_index=ignore_index, reduction=reduction
    )
    theirs.backward(torch.tensor(g))
    rtol, atol = tol(dtype)
    # every pixel ignored with 'mean': both give 0/0 = NaN (assert_allclose treats NaN == NaN)
    assert_close(ours.numpy(), theirs.detach().numpy(), rtol, atol, name="nll_loss forward")
    assert_close(ours_in.grad.numpy(), theirs_in.grad.numpy(), rtol, atol, name="nll_loss gradient")


@settings(max_examples=30)
@given(case=loss_cases())
def test_cross_entropy_is_nll_loss_of_log_softmax(case):
    x, target, weight, ignore_index, reduction = case
    results = []
    for fn in (lambda z: cross_entropy(z, T(target), _t(weight), ignore_index, reduction),
               lambda z: nll_loss(log_softmax(z, 1), T(target), _t(weight), ignore_index, reduction)):
        z = T(x, requires_grad=True)
        loss = fn(z)
        loss.sum().backward()
        results.append((loss.numpy(), z.grad.numpy()))
    (ce, ce_grad), (nll, nll_grad) = results
    assert_close(nll, ce, 1e-12, 1e-12, name="loss")  # float64: the two differ only in round-off
    assert_close(nll_grad, ce_grad, 1e-12, 1e-12, name="gradient")


@settings(max_examples=20)
@given(case=loss_cases())
def test_nll_loss_gradcheck(case):
    x, target, weight, ignore_index, reduction = case
    if reduction == "mean":
        assume((target != ignore_index).any())  # 'mean' over no pixel is NaN
    assert minseg.gradcheck(lambda z: nll_loss(z, T(target), _t(weight), ignore_index, reduction), [T(x, requires_grad=True)])


def test_nll_loss_by_hand():
    logp = np.log([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    target = np.array([1, 2, -100])
    w = np.array([1.0, 2.0, 4.0])
    # pixel 0: -2 log 0.25, pixel 1: -4 log 0.7, pixel 2 ignored; mean divides by 2 + 4
    by_hand = [-2 * math.log(0.25), -4 * math.log(0.7), 0.0]
    assert_close(nll_loss(T(logp), T(target), T(w), reduction="none").numpy(), np.array(by_hand), 1e-12, 1e-12)
    assert nll_loss(T(logp), T(target), T(w)).item() == pytest.approx(sum(by_hand) / 6, rel=1e-12)
    assert nll_loss(T(logp), T(target), reduction="sum").item() == pytest.approx(-math.log(0.25) - math.log(0.7), rel=1e-12)


# ------------------------------------------------------------------------ dice_loss


def _probabilities_as_logits(p):
    """Logits whose softmax over dim 1 is exactly p (up to round-off): log p."""
    return np.log(np.asarray(p, dtype=np.float64))


def test_dice_loss_by_hand():
    # one image, 2 classes, 3 pixels: p = (.75, .25), (.5, .5), (.9, .1); targets 0, 1, ignored
    p = np.array([[0.75, 0.5, 0.9], [0.25, 0.5, 0.1]])[None, :, None, :]
    x, target = T(_probabilities_as_logits(p)), T(np.array([[[0, 1, 255]]]))
    # class 0: I = .75, U = (.75 + .5) + 1 = 2.25; class 1: I = .5, U = (.25 + .5) + 1 = 1.75 (pixel 3 ignored)
    dice0, dice1 = 1.5 / 2.25, 1.0 / 1.75
    cases = [
        (dict(smooth=0.0), 1 - (dice0 + dice1) / 2),
        (dict(smooth=0.0, include_background=False), 1 - dice1),
        (dict(smooth=0.0, weight=T(np.array([1.0, 3.0]))), 1 - (dice0 + 3 * dice1) / 4),
        (dict(smooth=1.0), 1 - ((1.5 + 1) / 3.25 + (1 + 1) / 2.75) / 2),
    ]
    for kwargs, expected in cases:
        assert dice_loss(x, target, ignore_index=255, **kwargs).item() == pytest.approx(expected, rel=1e-12), kwargs


@given(n=st.integers(1, 2), c=st.integers(2, 5), hw=st.sampled_from([(1, 1), (3, 4), (5, 2)]), seed=st.integers(0, 2**16))
def test_dice_loss_is_zero_for_a_perfect_prediction_and_within_0_1(n, c, hw, seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, c, (n, *hw))
    perfect = 40.0 * (np.arange(c)[None, :, None, None] == target[:, None]).astype(np.float64)
    # softmax of a 40 logit gap leaves (C-1) e^-40 ~ 1e-17 off one-hot: Dice loss ~ 1e-17
    assert dice_loss(T(perfect), T(target)).item() < 1e-12
    assert dice_loss(T(perfect), T(target), include_background=False).item() < 1e-12  # absent classes: s / (~0 + s)
    worst = dice_loss(T(-perfect), T(target), smooth=0.0).item()  # mass everywhere but on the truth
    assert 0 < worst <= 1
    anything = dice_loss(T(rng.standard_normal((n, c, *hw)) * 3), T(target)).item()
    assert 0 <= anything <= 1


@settings(max_examples=20)
@given(case=loss_cases(), include_background=st.booleans(), smooth=st.sampled_from([0.0, 1.0]))
@example(case=(np.zeros((1, 2, 1, 1)), np.array([[[255]]]), None, 255, "mean"), include_background=True, smooth=1.0)
def test_dice_loss_gradcheck(case, include_background, smooth):
    x, target, weight, ignore_index, _ = case
    assume(x.shape[1] >= 2 or include_background)
    if smooth == 0:  # with no smoothing a class with U_c = 0 is 0/0: keep some predicted mass valid
        assume((target != ignore_index).any())
    if weight is not None and not include_background:
        assume(weight[1:].sum() > 0)
    fn = lambda z: dice_loss(z, T(target), _t(weight), ignore_index, smooth, include_background)
    assert minseg.gradcheck(fn, [T(x, requires_grad=True)])


# ----------------------------------------------------------------------- focal_loss


@settings(max_examples=30)
@given(case=loss_cases())
def test_focal_loss_with_gamma_0_is_cross_entropy(case):
    x, target, weight, ignore_index, reduction = case
    results = []
    for fn in (lambda z: cross_entropy(z, T(target), _t(weight), ignore_index, reduction),
               lambda z: focal_loss(z, T(target), _t(weight), 0.0, ignore_index, reduction)):
        z = T(x, requires_grad=True)
        loss = fn(z)
        loss.sum().backward()
        results.append((loss.numpy(), z.grad.numpy()))
    (ce, ce_grad), (fl, fl_grad) = results
    assert_close(fl, ce, 1e-12, 1e-12, name="loss")  # float64; the two differ only in round-off
    assert_close(fl_grad, ce_grad, 1e-12, 1e-12, name="gradient")


@settings(max_examples=30)
@given(case=loss_cases(), gamma=st.sampled_from([0.5, 1.0, 2.0, 3.5]))
def test_focal_loss_formula_and_bound(case, gamma):
    x, target, alpha, ignore_index, _ = case
    loss = focal_loss(T(x), T(target), _t(alpha), gamma, ignore_index, reduction="none").numpy()
    # the definition, written independently: log p from the shifted logits
    z = x - x.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    valid = target != ignore_index
    t = np.where(valid, target, 0)
    lp = np.take_along_axis(logp, t[:, None], axis=1)[:, 0]
    a = np.ones(x.shape[1]) if alpha is None else alpha
    expected = np.where(valid, -a[t] * (1 - np.exp(lp)) ** gamma * lp, 0.0)
    assert_close(loss, expected, 1e-12, 1e-14)
    ce = cross_entropy(T(x), T(target), _t(alpha), ignore_index, reduction="none").numpy()
    assert np.all(loss <= ce + 1e-15)  # (1 - p)^gamma <= 1: focal never exceeds cross-entropy


def test_focal_loss_by_hand():
    # p_t = .75 and .5: loss = -(1 - p)^2 log p
    x = _probabilities_as_logits([[0.75, 0.25], [0.5, 0.5]])
    target = np.array([0, 1])
    by_hand = [-(0.25**2) * math.log(0.75), -(0.5**2) * math.log(0.5)]
    assert_close(focal_loss(T(x), T(target), reduction="none").numpy(), np.array(by_hand), 1e-12, 1e-15)
    alpha = np.array([0.25, 1.0])
    weighted = (0.25 * by_hand[0] + by_hand[1]) / 1.25  # 'mean' divides by the summed alpha of the pixels
    assert focal_loss(T(x), T(target), T(alpha)).item() == pytest.approx(weighted, rel=1e-12)


@settings(max_examples=20)
@given(case=loss_cases(), gamma=st.sampled_from([0.5, 1.0, 2.0]))
def test_focal_loss_gradcheck(case, gamma):
    x, target, alpha, ignore_index, reduction = case
    if reduction == "mean":
        assume((target != ignore_index).any())
    fn = lambda z: focal_loss(z, T(target), _t(alpha), gamma, ignore_index, reduction)
    assert minseg.gradcheck(fn, [T(x, requires_grad=True)])


def test_focal_loss_gradient_is_finite_when_saturated():
    # p_t == 1 in float64 (q = 0): gamma < 1 would give 0 * inf in the naive q^(gamma-1) form
    x = T(np.array([[800.0, -800.0], [3.0, -3.0]]), requires_grad=True)
    focal_loss(x, T(np.array([0, 0])), gamma=0.5).backward()
    g = x.grad.numpy()
    assert np.isfinite(g).all() and np.all(g[0] == 0)


def test_losses_on_the_cpu_backend_match_numpy():
    rng = np.random.default_rng(1)
    x, target = rng.standard_normal((2, 3, 4, 5)).astype(np.float32), rng.integers(0, 3, (2, 4, 5))
    for fn in (dice_loss, lambda z, t: focal_loss(z, t, gamma=2.0), lambda z, t: nll_loss(log_softmax(z, 1), t)):
        out = []
        for name in ("numpy", "cpu"):
            with backend.using(name):
                z = T(x, requires_grad=True)
                loss = fn(z, T(target))
                loss.backward()
                out.append((loss.numpy(), z.grad.numpy()))
        assert_close(out[1][0], out[0][0], *tol(np.float32))
        assert_close(out[1][1], out[0][1], *tol(np.float32))


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, t: nll_loss(x, T(t.astype(np.float32))), TypeError, "integer class indices"),
        (lambda x, t: nll_loss(x, T(t[:, :2])), ValueError, r"target must have shape \(2, 3, 4\)"),
        (lambda x, t: nll_loss(x, T(t), reduction="avg"), ValueError, "reduction must be one of"),
        (lambda x, t: nll_loss(x, T(t + 5)), ValueError, r"target value \d is out of range: expected class indices in \[0, 2\]"),
        (lambda x, t: dice_loss(x, T(t), weight=T(np.ones(2))), ValueError, r"weight must have shape \(3,\)"),
        (lambda x, t: dice_loss(x, T(t), smooth=-1), ValueError, "smooth must be"),
        (lambda x, t: dice_loss(x[:, :1], T(t * 0), include_background=False), ValueError, "no class to score"),
        (lambda x, t: focal_loss(x, T(t), gamma=-1), ValueError, "gamma must be"),
        (lambda x, t: focal_loss(x, T(t), alpha=T(np.ones(4))), ValueError, r"alpha must have shape \(3,\)"),
        (lambda x, t: focal_loss(x[0, 0, 0], T(t)), ValueError, r"input must be \(N, C\) or \(N, C, H, W\)"),
    ],
)
def test_bad_input_names_the_argument(call, error, message):
    rng = np.random.default_rng(0)
    x, t = T(rng.standard_normal((2, 3, 3, 4))), rng.integers(0, 3, (2, 3, 4))
    with pytest.raises(error, match=message):
        call(x, t)
