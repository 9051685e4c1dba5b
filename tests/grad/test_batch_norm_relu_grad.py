"""batch_norm_relu backward is the derivative in input, weight and bias: minseg.gradcheck in float64
through minseg.functional.batch_norm_relu, training and eval, with and without affine, on the numpy
and cpu backends (the cuda one meets the same checks through the reference, tests/kernels).

The ReLU has a kink at 0, where central differences straddle two slopes: the inputs are drawn
from a continuous distribution, so no output lies within the 1e-6 step of 0 (probability
~1e-5 per output)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import batch_norm_relu


@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
@settings(max_examples=15)
@given(
    shape=st.sampled_from([(2, 3), (3, 2, 2), (2, 2, 3, 2), (1, 3, 2, 3), (1, 2, 5, 1)]),
    training=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batch_norm_relu_gradcheck(backend_name, shape, training, affine, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = minseg.Tensor(rng.standard_normal(shape) * 2 + 1, requires_grad=True)
    weight = minseg.Tensor(rng.standard_normal(c), requires_grad=True) if affine else None
    bias = minseg.Tensor(rng.standard_normal(c), requires_grad=True) if affine else None
    # as in test_batch_norm_grad: fixed running statistics in eval, none in training
    running = (None, None) if training else (minseg.Tensor(rng.standard_normal(c)), minseg.Tensor(rng.uniform(0.5, 2, c)))

    def fn(t, w, b):
        return batch_norm_relu(t, *running, weight=w, bias=b, training=training)

    with backend.using(backend_name):
        assert minseg.gradcheck(fn, [x, weight, bias], seed=seed)
