"""softmax_cross_entropy kernels: every backend module vs the NumPy reference, plus invariants.

Shapes stay under ~2000 elements per call so that CUDA kernels finish quickly
under the simulator. Values come from a seeded generator whose seed hypothesis
draws, so a failing example is reproducible from its printed arguments.
"""
import numpy as np
import pytest
from hypothesis import example, given
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
    """Logits (N, C, S) with N*C*S <= ~1500 (C = 1 and C > 32 included), targets with
    some/none/all pixels ignored, ignore_index -100, 255 or a valid class, optional class
    weights, any smoothing."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 8) | st.sampled_from([1, 33, 40]))
    s = draw(st.integers(1, max(1, min(60, 1500 // (n * c)))))
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


# 'mean' with ignore_index equal to a real class and some pixels ignored: D must count only kept pixels
MEAN_IGNORING_A_CLASS = dict(
    n=2, c=3, s=7, seed=3, target=np.array([[0, 1, 2, 1, 1, 0, 2], [1, 1, 0, 2, 2, 1, 0]], np.int64),
    ignore_index=1, weighted=True, reduction="mean", label_smoothing=0.1,
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


def _forward_backward(mod, args, gloss=None, seed=0):
    """(loss, dlogits, denom, n_invalid, glogits) of ``mod``; gloss drawn from ``seed`` unless given."""
    loss, dlogits, denom, n_invalid = mod.cross_entropy_forward(*args, True)
    if gloss is None:
        gloss = np.random.default_rng(seed).standard_normal(np.shape(loss)).astype(args[0].dtype)
    return loss, dlogits, denom, n_invalid, mod.cross_entropy_backward(dlogits, gloss, args[4])


@pytest.mark.parametrize("modname", MODULES)
@example(case=MEAN_IGNORING_A_CLASS, dtype=np.float32, scale=1.0)
@given(case=xent_cases(), dtype=dtypes, scale=scales)
@example(case=MEAN_IGNORING_A_REAL_CLASS[0], dtype=np.float32, scale=1.0)
@example(case=MEAN_IGNORING_A_REAL_CLASS[1], dtype=np.float64, scale=1.0)
def test_cross_entropy_matches_reference(modname, case, dtype, scale):
    mod = load(modname)
    args = _xent_args(case, dtype, scale)
    loss_ref, d_ref, denom_ref, invalid_ref, g_ref = _forward_backward(REF, args, seed=case["seed"] + 2)
    loss, dlogits, denom, n_invalid, g = _forward_backward(mod, args, seed=case["seed"] + 2)
    # 'sum'/'mean' add up to ~180 terms: float32 rounding stays well inside rtol 1e-4.
    # 'mean' with every pixel ignored is NaN in both (assert_allclose matches NaNs).
    rtol, atol = tol(dtype)
    assert_close(loss, loss_ref, rtol, atol, name="loss")
    assert_close(dlogits, d_ref, rtol, atol, name="dlogits")
    assert_close(denom, denom_ref, 1e-12, 0, name="denom (float64 sum of at most 180 weights)")
    assert int(n_invalid) == int(invalid_ref) == 0
    assert_close(g, g_ref, rtol, atol, name="glogits")
    _same_dtype([loss, dlogits, g], dtype)
    # inference: the same loss, and no gradient buffer
    loss_only, none, denom_only, _ = mod.cross_entropy_forward(*args, False)
    assert none is None
    assert_close(loss_only, loss, 0, 0, name="loss without the gradient")
    assert_close(denom_only, denom, 0, 0, name="denom without the gradient")


@pytest.mark.parametrize("modname", ALL_MODULES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_targets_out_of_range_are_counted_and_left_out(modname, reduction):
    """Targets outside [0, C) that are not ignore_index: counted (functional raises on the count)
    and treated as ignored -- the same outputs as with those pixels ignored, no read out of range."""
    mod = load(modname)
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 3, 9)).astype(np.float32)
    target = rng.integers(0, 3, (2, 9))
    target[0, 2], target[1, 5], target[1, 6], target[0, 7] = 3, -1, 1000, -100
    weight = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    cleaned = np.where((target < 0) | (target >= 3), -100, target)
    out = _forward_backward(mod, (logits, target, weight, -100, reduction, 0.2))
    expected = _forward_backward(REF, (logits, cleaned, weight, -100, reduction, 0.2))
    assert int(out[3]) == 3 and int(expected[3]) == 0
    for name, got, want in zip(("loss", "dlogits", "denom", "", "glogits"), out, expected):
        if name:
            assert_close(got, want, *tol(np.float32), name=name)


def _onehot(target, c):
    return (np.arange(c)[None, :, None] == target[:, None, :]).astype(np.float64)


@pytest.mark.parametrize("modname", ALL_MODULES)
@example(case=MEAN_IGNORING_A_CLASS, dtype=np.float64)
@given(case=xent_cases(), dtype=dtypes)
@with_xent_examples
def test_cross_entropy_gradient_is_weighted_p_minus_onehot(modname, case, dtype):
    """No smoothing, 'mean': g = w[t] (p - onehot(t)) / sum_valid w[t], exactly 0 where ignored."""
    mod = load(modname)
    case = dict(case, label_smoothing=0.0, reduction="mean")
    logits, target, weight, ignore_index, _, _ = args = _xent_args(case, dtype)
    g = np.asarray(_forward_backward(mod, args, gloss=np.ones((), dtype))[4])
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
    loss, dlogits, _, _, g = _forward_backward(mod, (logits, target, weight, -100, reduction, label_smoothing))
    assert np.isfinite(np.asarray(loss)).all() and np.isfinite(np.asarray(dlogits)).all() and np.isfinite(np.asarray(g)).all()
    if reduction == "none" and label_smoothing == 0.0:
        assert_close(loss, np.array([[2000.0, 0.0, 0.5 * (2000.0 + np.log(2))]]), 1e-6, 1e-3, name="loss")
    # p is one-hot, one-hot, (1/2, 1/2, 0) to float precision: dlogits = w_t (p - onehot) without smoothing,
    # divided by D = w[0] + w[0] + w[2] = 2.5 for 'mean' (dlogits is the gradient of the reduced loss)
    if label_smoothing == 0.0:
        expected = np.array([[[-1.0, 0.0, 0.25], [1.0, 0.0, 0.25], [0.0, 0.0, -0.5]]])
        assert_close(dlogits, expected / (2.5 if reduction == "mean" else 1.0), 1e-6, 1e-6, name="dlogits")


@pytest.mark.parametrize("modname", ALL_MODULES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_every_pixel_ignored(modname, reduction):
    """No kept pixel: loss 0 ('none', 'sum') or NaN ('mean', 0/0 as torch), D = 0, gradient exactly 0."""
    mod = load(modname)
    logits = np.random.default_rng(1).standard_normal((2, 4, 5)).astype(np.float32)
    target = np.full((2, 5), 2, np.int64)  # ignore_index = 2, a real class
    with np.errstate(invalid="ignore", divide="ignore"):
        loss, dlogits, denom, n_invalid, g = _forward_backward(mod, (logits, target, None, 2, reduction, 0.1))
    if reduction == "mean":
        assert np.isnan(np.asarray(loss))
    else:
        assert (np.asarray(loss) == 0).all()
    assert float(denom) == 0 and int(n_invalid) == 0
    assert (np.asarray(dlogits) == 0).all() and (np.asarray(g) == 0).all()


@pytest.mark.parametrize("modname", ALL_MODULES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_backward_by_gloss_one_is_dlogits(modname, reduction):
    """gloss = 1 (``loss.backward()``): the gradient is dlogits exactly. cpu returns the array itself for a
    scalar gloss (no pass), a fresh array otherwise; dlogits is never changed by the backward."""
    mod = load(modname)
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((2, 4, 9)).astype(np.float32)
    target = rng.integers(0, 4, (2, 9))
    target[0, :3] = -100
    _, dlogits, _, _ = mod.cross_entropy_forward(logits, target, None, -100, reduction, 0.1, True)
    kept = np.asarray(dlogits).copy()
    gloss = np.ones((2, 9) if reduction == "none" else (), np.float32)
    g = mod.cross_entropy_backward(dlogits, gloss, reduction)
    np.testing.assert_array_equal(np.asarray(g), kept)
    assert (g is dlogits) == (modname.endswith(".cpu") and reduction != "none")
    g2 = mod.cross_entropy_backward(dlogits, np.asarray(2 * gloss), reduction)
    assert g2 is not dlogits
    np.testing.assert_array_equal(np.asarray(g2), 2 * kept)  # times 2: exact in binary floating point
    np.testing.assert_array_equal(np.asarray(dlogits), kept)


@pytest.mark.parametrize("backend_name", ["numpy", "cpu", "cuda"])
def test_functional_cross_entropy_twice_through_a_retained_graph(backend_name):
    """A backward may hand the forward's gradient array out (cpu, gloss = 1), and its receiver may change
    it in place (``x.grad += ...``): a second backward through the retained graph must still be right."""
    import minseg
    from minseg import backend
    from minseg.functional import cross_entropy

    if backend_name not in backend.available_backends():
        pytest.skip(f"backend {backend_name} does not load here")
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    target = minseg.Tensor(rng.integers(0, 3, (2, 4, 5)))
    _, d_ref, _, _ = REF.cross_entropy_forward(logits.reshape(2, 3, 20), target.numpy().reshape(2, 20), None, -100, "mean", 0.1, True)
    with backend.using(backend_name):
        x = minseg.Tensor(logits, requires_grad=True)
        loss = cross_entropy(x, target, label_smoothing=0.1)
        ctx = loss._ctx  # CrossEntropyFunction's node ('mean': no reshape after it)
        one = backend.current().xp.ones((), np.float32)
        handed = ctx.function.backward(ctx, one)[0]
        assert_close(handed, d_ref.reshape(logits.shape), *tol(np.float32), name="first backward")
        handed[...] = 123  # the receiver owns what it was handed
        assert_close(ctx.function.backward(ctx, one)[0], d_ref.reshape(logits.shape), *tol(np.float32), name="second backward")
        # the same through Tensor.backward: x.grad accumulates, even after an in-place change
        loss.backward(retain_graph=True)
        x.grad.data[...] = 0
        loss.backward()
        assert_close(x.grad.numpy(), d_ref.reshape(logits.shape), *tol(np.float32), name="x.grad")
