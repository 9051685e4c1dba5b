"""relu's CUDA kernels against the NumPy reference, under the simulator when there is no GPU.

Sizes up to 800 elements span several 256-thread blocks with a partial last
block. Outputs come from ``cuda_common.empty`` (NaN-poisoned under the
simulator), so an element a kernel forgets to write fails the comparison --
except where the expected value is itself NaN, which only the NaN inputs give.
relu copies or zeroes: the comparison is exact.
"""
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernels.relu import cuda as K
from tests.helpers import assert_close, reference

R = reference("relu")


@settings(max_examples=10)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    dtype=st.sampled_from([np.float32, np.float64]),
    special=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_relu_forward_and_backward_match_reference(shape, dtype, special, seed):
    assume(np.prod(shape) <= 800)  # one simulated thread per element
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[:: 3] = 0  # exact zeros: the gradient there is 0, as torch
    if special:  # NaN stays NaN; +-inf and -0.0 behave
        x.flat[:4] = [np.nan, np.inf, -np.inf, -0.0][: x.size]
    y = K.relu_forward(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, R.relu_forward(x), rtol=0, atol=0, name="y")
    gy = rng.standard_normal(shape).astype(dtype)
    yr = R.relu_forward(x)
    assert_close(K.relu_backward(yr, gy), R.relu_backward(yr, gy), rtol=0, atol=0, name="gx")


def test_relu_spans_several_blocks():
    """3 blocks of 256 threads, the last one partial."""
    x = np.random.default_rng(0).standard_normal((3, 250)).astype(np.float32)
    assert_close(K.relu_forward(x), R.relu_forward(x), rtol=0, atol=0)


def test_relu_of_a_strided_view():
    """A transposed (non-contiguous) input: the wrapper copies it before the kernel indexes flat memory."""
    x = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32).T
    assert_close(K.relu_forward(x), R.relu_forward(x), rtol=0, atol=0)
