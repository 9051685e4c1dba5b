"""relu and cat (every backend) vs torch 2.13, forward and backward; dropout by its law
(minseg's masks come from its own generator, so they cannot equal torch's)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import cat, dropout, relu
from tests.helpers import assert_close, cat_pieces, oracle_backends, torch_or_skip

torch = torch_or_skip()

dtypes = st.sampled_from([np.float32, np.float64])


@pytest.mark.parametrize("backend_name", oracle_backends())
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    dtype=dtypes,
    transposed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_relu_matches_torch(backend_name, shape, dtype, transposed, seed):
    rng = np.random.default_rng(seed)
    # a third exactly 0, where both take the derivative to be 0
    x_np = np.where(rng.random(shape) < 1 / 3, 0.0, rng.standard_normal(shape)).astype(dtype)
    if transposed:
        x_np = x_np.T  # non-contiguous for ndim >= 2
    gy = rng.standard_normal(x_np.shape).astype(dtype)
    x = minseg.Tensor(x_np, requires_grad=True)
    with backend.using(backend_name):
        y = relu(x)
        y.backward(minseg.Tensor(gy))
    tx = torch.tensor(np.ascontiguousarray(x_np), requires_grad=True)
    ty = torch.relu(tx)
    ty.backward(torch.from_numpy(gy))
    assert_close(y.numpy(), ty.detach().numpy(), 0, 0, name="relu")  # exact: max and select
    assert_close(x.grad.numpy(), tx.grad.numpy(), 0, 0, name="relu gradient")


@pytest.mark.parametrize("backend_name", oracle_backends())
@given(
    base=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
    data=st.data(),
    dtype=dtypes,
    seed=st.integers(0, 2**32 - 1),
)
def test_cat_matches_torch(backend_name, base, data, dtype, seed):
    dim = data.draw(st.integers(-len(base), len(base) - 1), label="dim")
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), label="sizes along dim")
    rng = np.random.default_rng(seed)
    arrays = cat_pieces(base, dim, sizes, dtype, rng)  # then gy from the same generator
    tensors = [minseg.Tensor(a, requires_grad=True) for a in arrays]
    with backend.using(backend_name):
        y = cat(tensors, dim)
        gy = rng.standard_normal(y.shape).astype(dtype)
        y.backward(minseg.Tensor(gy))
    ttensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    ty = torch.cat(ttensors, dim)
    ty.backward(torch.from_numpy(gy))
    assert_close(y.numpy(), ty.detach().numpy(), 0, 0, name="cat")  # copies: exact
    for i, (t, tt) in enumerate(zip(tensors, ttensors)):
        assert_close(t.grad.numpy(), tt.grad.numpy(), 0, 0, name=f"gradient of piece {i}")


# ------------------------------------------------------------------------ dropout


def _run_dropout(backend_name, x_np, p, training):
    x = minseg.Tensor(x_np, requires_grad=True)
    with backend.using(backend_name):
        y = dropout(x, p, training)
        y.backward(minseg.Tensor(np.ones_like(x_np)))
    return y.numpy(), x.grad.numpy()


@pytest.mark.parametrize("backend_name", oracle_backends())
@pytest.mark.parametrize("p, training", [(0.0, True), (0.5, False), (1.0, False)])
def test_dropout_identity_cases(backend_name, p, training):
    """p = 0, or eval mode: y = x and gradient 1 (torch returns the input unchanged too)."""
    x_np = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    y, g = _run_dropout(backend_name, x_np, p, training)
    np.testing.assert_array_equal(y, x_np)
    np.testing.assert_array_equal(g, np.ones_like(x_np))
    np.testing.assert_array_equal(y, torch.nn.functional.dropout(torch.from_numpy(x_np), p, training).numpy())


@pytest.mark.parametrize("backend_name", oracle_backends())
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_law(backend_name, p, dtype):
    """Each element is kept with probability 1 - p and scaled by 1/(1-p); the gradient is the mask."""
    minseg.manual_seed(123)
    x_np = np.random.default_rng(1).uniform(0.5, 2.0, (8, 25, 50)).astype(dtype)  # no zeros: kept is y != 0
    y, g = _run_dropout(backend_name, x_np, p, True)
    kept = y != 0
    assert_close(y[kept], x_np[kept] / (1 - p), 1e-6, 0, name="kept values")  # one rounding of x * (1/(1-p))
    assert_close(g, kept / (1 - p), 1e-6, 0, name="gradient = mask")
    # kept count ~ Binomial(n, 1 - p): within 5 standard deviations
    n = x_np.size
    assert abs(kept.sum() - n * (1 - p)) <= 5 * np.sqrt(n * p * (1 - p))
    assert y.dtype == dtype and g.dtype == dtype


@pytest.mark.parametrize("backend_name", oracle_backends())
def test_dropout_p1_zeroes_everything_and_seed_reproduces_the_mask(backend_name):
    x_np = np.ones((4, 6))
    y, g = _run_dropout(backend_name, x_np, 1.0, True)
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_array_equal(g, 0.0)
    minseg.manual_seed(7)
    first = _run_dropout(backend_name, x_np, 0.5, True)[0]
    minseg.manual_seed(7)
    np.testing.assert_array_equal(_run_dropout(backend_name, x_np, 0.5, True)[0], first)
