"""minseg.functional softmax, log_softmax and cross_entropy (every backend) vs torch 2.13:
forward and backward, whole tensors, every cross_entropy option (class weights,
ignore_index incl. every pixel ignored, reductions, label smoothing), (N, C) and
(N, C, H, W) inputs, contiguous or not."""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import cross_entropy, log_softmax, softmax
from tests.helpers import assert_close, oracle_backends, torch_or_skip

torch = torch_or_skip()
F = torch.nn.functional

dtypes = st.sampled_from([np.float32, np.float64])
# float32: forward within 1e-5 (relative on large log-probabilities), gradients within 1e-4
FWD, GRAD = dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-4)


def _input(rng, shape, dtype, scale, transposed):
    """Logits of ``shape``; ``transposed``: a non-contiguous view (last two axes swapped in memory)."""
    if transposed and len(shape) >= 2:
        base = rng.standard_normal(shape[:-2] + shape[-2:][::-1]) * scale
        return base.swapaxes(-1, -2).astype(dtype, copy=False)
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("backend_name", oracle_backends())
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
    data=st.data(),
    dtype=dtypes,
    scale=st.sampled_from([1.0, 30.0]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_softmax_and_log_softmax_match_torch(backend_name, shape, data, dtype, scale, transposed, seed):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    rng = np.random.default_rng(seed)
    x_np = _input(rng, shape, dtype, scale, transposed)
    gy = rng.standard_normal(shape).astype(dtype)
    for ours, theirs in ((softmax, torch.softmax), (log_softmax, torch.log_softmax)):
        x = minseg.Tensor(x_np, requires_grad=True)
        with backend.using(backend_name):
            y = ours(x, dim)
            y.backward(minseg.Tensor(gy))
        tx = torch.tensor(np.ascontiguousarray(x_np), requires_grad=True)
        ty = theirs(tx, dim)
        ty.backward(torch.from_numpy(gy))
        assert_close(y.numpy(), ty.detach().numpy(), **FWD, name=f"{ours.__name__} forward")
        assert_close(x.grad.numpy(), tx.grad.numpy(), **GRAD, name=f"{ours.__name__} gradient")


@st.composite
def xent_cases(draw):
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    spatial = draw(st.sampled_from([(), (1, 1), (3, 4), (5, 2), (1, 7)]))
    ignore_index = draw(st.sampled_from([-100, 255, 0, 2]))
    return dict(
        shape=(n, c) + spatial,
        ignore_index=ignore_index,
        ignored_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        weighted=draw(st.booleans()),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        transposed=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 30.0])),
    )


@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=60)
@given(case=xent_cases(), dtype=dtypes, seed=st.integers(0, 2**32 - 1))
# 'mean' with ignore_index a real class (its pixels leave the loss and the denominator, its logit
# stays in every softmax) and a third of the pixels ignored besides: rare in draws
@example(case=dict(shape=(2, 4, 3, 4), ignore_index=2, ignored_fraction=0.3, weighted=True, reduction="mean",
                   label_smoothing=0.0, transposed=False, scale=1.0), dtype=np.float32, seed=0)
@example(case=dict(shape=(3, 4), ignore_index=0, ignored_fraction=0.3, weighted=False, reduction="mean",
                   label_smoothing=0.1, transposed=False, scale=1.0), dtype=np.float64, seed=1)
def test_cross_entropy_matches_torch(backend_name, case, dtype, seed):
    rng = np.random.default_rng(seed)
    shape, c = case["shape"], case["shape"][1]
    x_np = _input(rng, shape, dtype, case["scale"], case["transposed"] and len(shape) == 4)
    target = rng.integers(0, c, (shape[0],) + shape[2:])
    target[rng.random(target.shape) < case["ignored_fraction"]] = case["ignore_index"]
    w_np = rng.uniform(0.1, 2.0, c).astype(dtype) if case["weighted"] else None
    kwargs = dict(ignore_index=case["ignore_index"], reduction=case["reduction"], label_smoothing=case["label_smoothing"])
    gloss = rng.standard_normal(target.shape if case["reduction"] == "none" else ()).astype(dtype)

    x = minseg.Tensor(x_np, requires_grad=True)
    with backend.using(backend_name):
        loss = cross_entropy(x, minseg.Tensor(target), None if w_np is None else minseg.Tensor(w_np), **kwargs)
        loss.backward(minseg.Tensor(gloss))
    tx = torch.tensor(np.ascontiguousarray(x_np), requires_grad=True)
    tloss = F.cross_entropy(tx, torch.from_numpy(target), None if w_np is None else torch.from_numpy(w_np), **kwargs)
    tloss.backward(torch.from_numpy(gloss))

    assert loss.dtype == dtype and loss.shape == tuple(tloss.shape)
    # 'mean' with every pixel ignored is NaN in both; assert_allclose matches NaNs
    assert_close(loss.numpy(), tloss.detach().numpy(), **FWD, name="loss")
    # torch's gradient is 0 at ignored pixels even when 'mean' is NaN; so is ours
    assert_close(x.grad.numpy(), tx.grad.numpy(), **GRAD, name="gradient")


@pytest.mark.parametrize("backend_name", oracle_backends())
def test_all_ignored_mean_is_nan_with_zero_gradient_and_no_warning(backend_name):
    x = minseg.Tensor(np.random.default_rng(0).standard_normal((2, 3, 2, 2)), requires_grad=True)
    target = minseg.Tensor(np.full((2, 2, 2), -100))
    with backend.using(backend_name), np.errstate(all="raise"):
        loss = cross_entropy(x, target, label_smoothing=0.2)
        loss.backward()
    assert np.isnan(loss.item())
    np.testing.assert_array_equal(x.grad.numpy(), 0.0)
    tx = torch.tensor(x.numpy(), requires_grad=True)
    tloss = F.cross_entropy(tx, torch.from_numpy(target.numpy()), label_smoothing=0.2)
    tloss.backward()
    assert np.isnan(tloss.item()) and (tx.grad == 0).all()


@pytest.mark.parametrize("backend_name", oracle_backends())
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_mean_divides_by_non_ignored_weight(backend_name, weighted):
    """torch 2.13 normalises the smoothing term under 'mean' by the same sum of w[t_i] over
    non-ignored pixels as the NLL term (not by all pixels): pin that with a hand computation."""
    x_np = np.array([[[2.0, -1.0, 0.5], [0.0, 1.0, 0.5]]])  # N=1, C=2, S=3
    target = np.array([[0, -100, 1]])
    w = np.array([2.0, 0.5]) if weighted else np.ones(2)
    logp = x_np - np.log(np.exp(x_np).sum(axis=1, keepdims=True))
    eps = 0.4
    per_pixel = [-(1 - eps) * w[t] * logp[0, t, s] - eps / 2 * (w * logp[0, :, s]).sum() for s, t in ((0, 0), (2, 1))]
    expected = sum(per_pixel) / (w[0] + w[1])
    with backend.using(backend_name):
        loss = cross_entropy(
            minseg.Tensor(x_np), minseg.Tensor(target), minseg.Tensor(w) if weighted else None, label_smoothing=eps
        )
    tloss = F.cross_entropy(torch.from_numpy(x_np), torch.from_numpy(target), torch.from_numpy(w) if weighted else None, label_smoothing=eps)
    assert abs(tloss.item() - expected) < 1e-12
    assert abs(loss.item() - expected) < 1e-12
