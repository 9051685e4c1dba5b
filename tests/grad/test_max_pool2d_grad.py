"""max_pool2d's backward is the derivative: minseg.gradcheck through minseg.functional.max_pool2d
(numpy backend, float64). The inputs are a permutation of well-separated values, so no window
has a near-tie that a finite-difference step of 1e-6 could flip."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import max_pool2d
from tests.kernels.test_max_pool2d import pool_cases


@settings(max_examples=20)
@given(case=pool_cases(max_planes=1, max_side=7), seed=st.integers(0, 2**16))
def test_max_pool2d_gradcheck(case, seed):
    rng = np.random.default_rng(seed)
    shape = case["shape"]
    values = rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1  # distinct, 0.1 apart
    x = minseg.Tensor(values.astype(np.float64), requires_grad=True)
    k, s, p, d, ceil_mode = case["args"]
    with backend.using("numpy"):
        assert minseg.gradcheck(lambda t: max_pool2d(t, k, s, p, d, ceil_mode), [x], seed=seed)
