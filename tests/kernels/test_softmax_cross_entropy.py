"""softmax_cross_entropy kernels: every backend module vs the NumPy reference, plus invariants.

Shapes stay under ~2000 elements per call so that CUDA kernels finish quickly
under the simulator. Values come from a seeded generator whose seed hypothesis
draws, so a failing example is reproducible from its printed arguments.
"""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.helpers import assert_close, kernel_modules, load, reference, tol

REF = reference("softmax_cross_entropy")
MODULES = kernel_modules("softmax_cross_entropy")
ALL_MODULES = [pytest.param("kernels.softmax_cross_entropy.reference", id="numpy")] + MODULES

dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)
scales = st.sampled_from([0.1, 1.0, 10.0, 1000.0])  # 1000: exp(x) overflows unless max-subtracted


@st.composite
def softmax_cases(draw):
    """(shape, dim): 1- to 4-D, sizes 1..6 (odd sizes and 1s included), any dim (also negative)."""
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    return shape, draw(st.integers(-len(shape), len(shape) - 1)) % len(shape)


def _logits(seed, shape, dtype, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def _same_dtype(arrays, dtype):
    for a in arrays:
        assert np.asarray(a).dtype == dtype, f"output dtype {np.asarray(a).dtype} != input dtype {np.dtype(dtype)}"


# ------------------------------------------------------------------------ softmax


@pytest.mark.parametrize("modname", MODULES)
@given(case=softmax_cases(), dtype=dtypes, seed=seeds, scale=scales)
def test_softmax_matches_reference(modname, case, dtype, seed, scale):
    mod = load(modname)
    shape, dim = case
    x = _logits(seed, shape, dtype, scale)
    gy = _logits(seed + 1, shape, dtype)
    rtol, atol = tol(dtype)
    for log in (False, True):
        fwd = REF.log_softmax_forward if log else REF.softmax_forward
        bwd_name = "log_softmax_backward" if log else "softmax_backward"
        y_ref = fwd(x, dim)
        y = getattr(mod, fwd.__name__)(x, dim)
        # log-softmax at scale 1000 reaches ~2000 in magnitude: rtol covers it
        assert_close(y, y_ref, rtol, atol, name=fwd.__name__)
        gx = getattr(mod, bwd_name)(y_ref, gy, dim)
        assert_close(gx, getattr(REF, bwd_name)(y_ref, gy, dim), rtol, atol, name=bwd_name)
        _same_dtype([y, gx], dtype)


@pytest.mark.parametrize("modname", ALL_MODULES)
@given(case=softmax_cases(), dtype=dtypes, seed=seeds, shift=st.integers(-1000, 1000))
def test_softmax_sums_to_one_and_ignores_a_shift(modname, case, dtype, seed, shift):
    mod = load(modname)
    shape, dim = case
    # Logits on a grid of 1/8 and integer shifts: x + shift is exact in both dtypes,
    # and so is (x + shift) - max, so max-subtraction must give the same probabilities.
    x = (np.random.default_rng(seed).integers(-64, 64, shape) / 8).astype(dtype)
    # one shift per slice along dim (it varies across the other axes)
    shifts = np.random.default_rng(seed + 1).integers(-abs(shift), abs(shift) + 1, x.sum(axis=dim, keepdims=True).shape)
    y = mod.softmax_forward(x, dim)
    assert (np.asarray(y) >= 0).all()
    # a sum of C <= 6 probabilities in float32: a few ulp of 1
    assert_close(np.asarray(y).sum(axis=dim), np.ones(x.sum(axis=dim).shape), 0, 1e-6 if dtype == np.float32 else 1e-14)
    rtol, atol = tol(dtype)
    assert_close(mod.softmax_forward(x + shifts.astype(dtype), dim), y, rtol, atol, name="softmax(x + shift)")
    assert_close(mod.log_softmax_forward(x + shifts.astype(dtype), dim), mod.log_softmax_forward(x, dim), rtol, atol)


@pytest.mark.parametrize("modname", ALL_MODULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_of_huge_logits_is_finite(modname, dtype):
    mod = load(modname)
    x = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0]], dtype)
    assert_close(mod.softmax_forward(x, 1), np.array([[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]]), 1e-6, 0)
    assert_close(mod.log_softmax_forward(x, 1), np.array([[0, -2000, -1000], [-np.log(3)] * 3]), 1e-6, 0)


# ------------------------------------------------------------------ cross-entropy


@st.composite
def xent_cases(draw):
    """Logits (N, C, S) with N*C*S <= ~1500, targets with some/none/all pixels ignored,
    ignore_index -100, 255 or a valid class, optional class weights, any smoothing."""
    n, c, s = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 60))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    ignore_index = draw(st.sampled_from([-100, 255, 0, 1]))
    target = rng.integers(0, c, (n, s))
    ignored_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    target[rng.random((n, s)) < ignored_fraction] = ignore_index
    return dict(
        n=n,
        c=c,
        s=s,
        seed=seed,
        target=target.astype(np.int64),
        ignore_index=ignore_index,
        weighted=draw(st.booleans()),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
    )


def mean_ignoring_a_real_class(ignore_index, weighted, label_smoothing, seed=0):
    """'mean' over 2x12 pixels whose targets include ``ignore_index`` (a real class of the 4): the pixels of
    that class are ignored, so they leave the loss, the gradient and the denominator, while the class's
    own logit still enters every other pixel's softmax. Draws combine these rarely."""
    target = np.random.default_rng(seed).integers(0, 4, (2, 12))
    target[:, :3] = ignore_index  # at least 6 ignored pixels, and valid ones of every other class
    return dict(n=2, c=4, s=12, seed=seed, target=target.astype(np.int64), ignore_index=ignore_index,
                weighted=weighted, reduction="mean", label_smoothing=label_smoothing)


MEAN_IGNORING_A_REAL_CLASS = [
    mean_ignoring_a_real_class(1, weighted=True, label_smoothing=0.0),
    mean_ignoring_a_real_class(0, weighted=False, label_smoothing=0.1, seed=1),
]


def with_xent_examples(test):
    for case in MEAN_IGNORING_A_REAL_CLASS:
        test = example(case=case, dtype=np.float64)(test)
    return test


def _xent_args(case, dtype, scale=1.0):
    rng = np.random.default_rng(case["seed"] + 1)
    logits = (rng.standard_normal((case["n"], case["c"], case["s"])) * scale).astype(dtype)
    weight = rng.uniform(0.1, 2.0, case["c"]).astype(dtype) if case["weighted"] else None
    return logits, case["target"], weight, case["ignore_index"], case["reduction"], case["label_smoothing"]


@pytest.mark.parametrize("modname", MODULES)
@given(case=xent_cases(), dtype=dtypes, scale=scales)
@example(case=MEAN_IGNORING_A_REAL_CLASS[0], dtype=np.float32, scale=1.0)
@example(case=MEAN_IGNORING_A_REAL_CLASS[1], dtype=np.float64, scale=1.0)
def test_cross_entropy_matches_reference(modname, case, dtype, scale):
    mod = load(modname)
    args = _xent_args(case, dtype, scale)
    loss_ref, lse_ref = REF.cross_entropy_forward(*args)
    loss, lse = mod.cross_entropy_forward(*args)
    # 'sum'/'mean' add up to ~180 terms: float32 rounding stays well inside rtol 1e-4.
    # 'mean' with every pixel ignored is NaN in both (assert_allclose matches NaNs).
    rtol, atol = tol(dtype)
    assert_close(loss, loss_ref, rtol, atol, name="loss")
    assert_close(lse, lse_ref, rtol, atol, name="lse")
    gloss = np.random.default_rng(case["seed"] + 2).standard_normal(np.shape(loss_ref)).astype(dtype)
    g = mod.cross_entropy_backward(*args, lse_ref, gloss)
    assert_close(g, REF.cross_entropy_backward(*args, lse_ref, gloss), rtol, atol, name="glogits")
    _same_dtype([loss, lse, g], dtype)


def _onehot(target, c):
    return (np.arange(c)[None, :, None] == target[:, None, :]).astype(np.float64)


@pytest.mark.parametrize("modname", ALL_MODULES)
@given(case=xent_cases(), dtype=dtypes)
@with_xent_examples
def test_cross_entropy_gradient_is_weighted_p_minus_onehot(modname, case, dtype):
    """No smoothing, 'mean': g = w[t] (p - onehot(t)) / sum_valid w[t], exactly 0 where ignored."""
    mod = load(modname)
    case = dict(case, label_smoothing=0.0, reduction="mean")
    logits, target, weight, ignore_index, _, _ = args = _xent_args(case, dtype)
    _, lse = mod.cross_entropy_forward(*args)
    g = np.asarray(mod.cross_entropy_backward(*args, lse, np.ones((), dtype)))
    valid = target != ignore_index
    t = np.where(valid, target, 0)
    w = np.ones(case["c"]) if weight is None else weight.astype(np.float64)
    w_t = np.where(valid, w[t], 0.0)
    p = REF.softmax_forward(logits.astype(np.float64), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = w_t[:, None] * (p - _onehot(t, case["c"])) / w_t.sum()
    expected = np.where(valid[:, None, :], expected, 0.0)
    assert (g.transpose(0, 2, 1)[~valid] == 0).all(), "gradient must be exactly 0 at ignored pixels"
    rtol, atol = tol(dtype)
    assert_close(g, expected, rtol, atol, name="w_t (p - onehot) / D")


@pytest.mark.parametrize("modname", ALL_MODULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_cross_entropy_of_huge_logits_is_finite(modname, dtype, reduction, label_smoothing):
    mod = load(modname)
    # pixel 0: target has logit -1000 against +1000 -> loss 2000 (times 1-eps, + smoothing)
    logits = np.array([[[-1000.0, 1000.0, 1000.0], [1000.0, -1000.0, 1000.0], [0.0, 0.0, -1000.0]]], dtype)
    target = np.array([[0, 0, 2]], np.int64)
    weight = np.array([1.0, 2.0, 0.5], dtype)
    loss, lse = mod.cross_entropy_forward(logits, target, weight, -100, reduction, label_smoothing)
    gloss = np.ones(np.shape(loss), dtype)
    g = mod.cross_entropy_backward(logits, target, weight, -100, reduction, label_smoothing, lse, gloss)
    assert np.isfinite(np.asarray(loss)).all() and np.isfinite(np.asarray(lse)).all() and np.isfinite(np.asarray(g)).all()
    assert_close(lse, np.array([[1000.0, 1000.0, 1000.0 + np.log(2)]]), 1e-6, 0, name="lse")
    if reduction == "none" and label_smoothing == 0.0:
        assert_close(loss, np.array([[2000.0, 0.0, 0.5 * (2000.0 + np.log(2))]]), 1e-6, 1e-3, name="loss")
