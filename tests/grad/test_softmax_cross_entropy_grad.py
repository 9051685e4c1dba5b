"""softmax, log_softmax and cross_entropy backward are the derivatives: minseg.gradcheck
through minseg.functional (numpy backend, float64), every option of cross_entropy."""
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import cross_entropy, log_softmax, softmax


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple).filter(lambda s: np.prod(s) <= 48),
    data=st.data(),
    log=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_softmax_gradcheck(shape, data, log, transposed, seed):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    x = minseg.Tensor(np.random.default_rng(seed).standard_normal(shape) * 3, requires_grad=True)
    op = log_softmax if log else softmax

    def fn(t):
        # transposed: the op sees a non-contiguous view (functional copies it, in the graph)
        return op(t.transpose(0, -1), dim) if transposed else op(t, dim)

    with backend.using("numpy"):
        assert minseg.gradcheck(fn, [x], seed=seed)


@settings(max_examples=40)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 5),
    spatial=st.sampled_from([(), (1, 1), (2, 3), (3, 1)]),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    weighted=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.2, 1.0]),
    ignore_index=st.sampled_from([-100, 255, 0]),
    seed=st.integers(0, 2**16),
)
def test_cross_entropy_gradcheck(n, c, spatial, reduction, weighted, label_smoothing, ignore_index, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c) + spatial
    x = minseg.Tensor(rng.standard_normal(shape) * 2, requires_grad=True)
    target = rng.integers(0, c, (n,) + spatial)
    target[rng.random(target.shape) < 0.3] = ignore_index
    if reduction == "mean":  # 'mean' over no pixel is NaN: keep one pixel with a non-ignored class
        classes = [k for k in range(c) if k != ignore_index]
        assume(classes)
        target.reshape(-1)[0] = classes[0]
    weight = minseg.Tensor(rng.uniform(0.2, 2.0, c)) if weighted else None
    with backend.using("numpy"):
        assert minseg.gradcheck(
            lambda t: cross_entropy(
                t, minseg.Tensor(target), weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
            ),
            [x],
            seed=seed,
        )
