"""minseg.functional.avg_pool2d / adaptive_avg_pool2d vs torch.nn.functional, on every backend:
values and input gradients, whole tensors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import adaptive_avg_pool2d, avg_pool2d
from tests.helpers import assert_close, oracle_backends, torch_or_skip
from tests.kernels.test_avg_pool2d import ADAPTIVE_EDGES, AVG_EDGES, adaptive_cases, avg_pool_cases, with_examples

torch = torch_or_skip()
F = torch.nn.functional
dtypes = st.sampled_from([np.float32, np.float64])


def _compare(backend_name, ours, theirs, x_np, gy_np):
    """Forward and input gradient of ours (minseg) and theirs (torch) on the same input and upstream gradient."""
    x = minseg.Tensor(x_np, requires_grad=True)
    with backend.using(backend_name):
        y = ours(x)
        y.backward(minseg.Tensor(gy_np))
    tx = torch.tensor(x_np, requires_grad=True)
    ty = theirs(tx)
    ty.backward(torch.from_numpy(gy_np))
    # means of at most 25 (pool) or ~30 (adaptive) float32 terms, summed in another order
    assert_close(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-6, name="y")
    assert_close(x.grad.numpy(), tx.grad.numpy(), rtol=1e-5, atol=1e-6, name="gx")


@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=15)
@given(case=avg_pool_cases(max_side=7), seed=st.integers(0, 2**16))
@with_examples(AVG_EDGES)
def test_avg_pool2d_matches_torch(backend_name, case, seed):
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    x = rng.standard_normal(case["shape"]).astype(dtype)
    gy = rng.standard_normal(case["shape"][:2] + case["out"]).astype(dtype)
    k, s, p, ceil_mode, count_include_pad, divisor = case["args"]
    _compare(
        backend_name,
        lambda t: avg_pool2d(t, k, s, p, ceil_mode, count_include_pad, divisor),
        lambda t: F.avg_pool2d(t, k, s, p, ceil_mode, count_include_pad, divisor),
        x, gy,
    )


@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=15)
@given(case=adaptive_cases(max_side=7), seed=st.integers(0, 2**16))
@with_examples(ADAPTIVE_EDGES)
def test_adaptive_avg_pool2d_matches_torch(backend_name, case, seed):
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    x = rng.standard_normal(case["shape"]).astype(dtype)
    gy = rng.standard_normal(case["shape"][:2] + case["out"]).astype(dtype)
    _compare(backend_name, lambda t: adaptive_avg_pool2d(t, case["out"]), lambda t: F.adaptive_avg_pool2d(t, case["out"]), x, gy)


@pytest.mark.parametrize("backend_name", oracle_backends())
def test_adaptive_output_size_with_none_and_a_non_contiguous_input(backend_name):
    """None keeps the input side (torch's rule); a transposed view is copied before the kernel."""
    base = np.random.default_rng(0).standard_normal((3, 2, 5, 6)).astype(np.float32)
    x = base.transpose(1, 0, 3, 2)  # (2, 3, 6, 5), not contiguous
    gy = np.random.default_rng(1).standard_normal((2, 3, 6, 4)).astype(np.float32)
    _compare(
        backend_name, lambda t: adaptive_avg_pool2d(t, (None, 4)), lambda t: F.adaptive_avg_pool2d(t, (None, 4)), x, gy
    )
