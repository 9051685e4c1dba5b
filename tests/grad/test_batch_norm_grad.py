"""batch_norm backward is the derivative in input, weight and bias: minseg.gradcheck through
minseg.functional.batch_norm (numpy backend, float64), training and eval, with and without affine."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import batch_norm


@settings(max_examples=30)
@given(
    shape=st.sampled_from([(2, 3), (3, 2, 2), (2, 2, 3, 2), (1, 3, 2, 3), (4, 1, 1, 1), (1, 2, 5, 1)]),
    training=st.booleans(),
    affine=st.booleans(),
    eps=st.sampled_from([1e-5, 0.5]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batch_norm_gradcheck(shape, training, affine, eps, transposed, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    transposed = transposed and len(shape) == 4
    # transposed: x is stored (N, C, W, H) and batch_norm sees its non-contiguous (N, C, H, W) view
    stored = shape[:2] + shape[2:][::-1] if transposed else shape
    x = minseg.Tensor(rng.standard_normal(stored) * 2 + 1, requires_grad=True)
    weight = minseg.Tensor(rng.standard_normal(c), requires_grad=True) if affine else None
    bias = minseg.Tensor(rng.standard_normal(c), requires_grad=True) if affine else None
    # eval normalises with fixed running statistics; in training they would change on
    # every forward of the finite differences, so none are passed there
    running = (None, None) if training else (minseg.Tensor(rng.standard_normal(c)), minseg.Tensor(rng.uniform(0.5, 2, c)))

    def fn(t, w, b):
        t = t.permute(0, 1, 3, 2) if transposed else t
        return batch_norm(t, *running, weight=w, bias=b, training=training, eps=eps)

    with backend.using("numpy"):
        assert minseg.gradcheck(fn, [x, weight, bias], seed=seed)
