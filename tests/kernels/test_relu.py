"""elementwise kernels (relu): every backend module vs the NumPy reference."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import assert_close, kernel_modules, load, reference

REF = reference("relu")
MODULES = kernel_modules("relu")
ALL_MODULES = [pytest.param("kernels.relu.reference", id="numpy")] + MODULES


@pytest.mark.parametrize("modname", MODULES)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),  # <= 1296 elements
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_relu_matches_reference(modname, shape, dtype, seed):
    mod = load(modname)
    rng = np.random.default_rng(seed)
    # a third of the inputs exactly 0: the derivative there must be 0, as torch
    x = np.where(rng.random(shape) < 1 / 3, 0.0, rng.standard_normal(shape)).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    y = mod.relu_forward(x)
    assert_close(y, REF.relu_forward(x), 0, 0, name="y")  # max and select are exact
    gx = mod.relu_backward(REF.relu_forward(x), gy)
    assert_close(gx, REF.relu_backward(REF.relu_forward(x), gy), 0, 0, name="gx")
    assert np.asarray(y).dtype == dtype and np.asarray(gx).dtype == dtype


@pytest.mark.parametrize("modname", ALL_MODULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_values_and_zero_gradient_at_zero(modname, dtype):
    mod = load(modname)
    x = np.array([[-2.0, -0.0, 0.0, 0.5, 3.0, np.nan]], dtype)
    y = np.asarray(mod.relu_forward(x))
    assert_close(y, np.array([[0, 0, 0, 0.5, 3, np.nan]]), 0, 0, name="relu")  # NaN propagates, as torch
    gx = mod.relu_backward(y[:, :5], np.full((1, 5), 7.0, dtype))
    assert_close(gx, np.array([[0, 0, 0, 7, 7]]), 0, 0, name="relu gradient")
