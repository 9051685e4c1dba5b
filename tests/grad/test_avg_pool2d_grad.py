"""avg_pool2d's and adaptive_avg_pool2d's backward is the derivative: minseg.gradcheck through
minseg.functional (numpy backend, float64)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import adaptive_avg_pool2d, avg_pool2d
from tests.kernels.test_avg_pool2d import ADAPTIVE_EDGES, AVG_EDGES, adaptive_cases, avg_pool_cases, with_examples


@settings(max_examples=15)
@given(case=avg_pool_cases(max_planes=1, max_side=6), seed=st.integers(0, 2**16))
@with_examples(AVG_EDGES)
def test_avg_pool2d_gradcheck(case, seed):
    x = minseg.Tensor(np.random.default_rng(seed).standard_normal(case["shape"]), requires_grad=True)
    with backend.using("numpy"):
        assert minseg.gradcheck(lambda t: avg_pool2d(t, *case["args"]), [x], seed=seed)


@settings(max_examples=15)
@given(case=adaptive_cases(max_planes=1, max_side=6), seed=st.integers(0, 2**16))
@with_examples(ADAPTIVE_EDGES)
def test_adaptive_avg_pool2d_gradcheck(case, seed):
    x = minseg.Tensor(np.random.default_rng(seed).standard_normal(case["shape"]), requires_grad=True)
    with backend.using("numpy"):
        assert minseg.gradcheck(lambda t: adaptive_avg_pool2d(t, case["out"]), [x], seed=seed)
