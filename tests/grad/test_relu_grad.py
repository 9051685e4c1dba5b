"""relu backward is the derivative away from 0: minseg.gradcheck through minseg.functional.relu
(numpy backend, float64). Inputs keep |x| >= 0.1, far beyond the finite-difference step."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import relu


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple).filter(lambda s: np.prod(s) <= 50),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_relu_gradcheck(shape, transposed, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    x = minseg.Tensor(x, requires_grad=True)
    with backend.using("numpy"):
        # transposed: relu sees a non-contiguous view (a copy is made inside the graph)
        assert minseg.gradcheck(lambda t: relu(t.transpose(0, -1) if transposed else t), [x], seed=seed)
