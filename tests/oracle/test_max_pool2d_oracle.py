"""minseg.functional.max_pool2d (every backend) vs torch.nn.functional.max_pool2d:
values, return_indices and the input gradient, whole tensors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import max_pool2d
from tests.helpers import assert_close, oracle_backends, torch_or_skip
from tests.kernels.test_max_pool2d import draw_input, pool_cases

torch = torch_or_skip()
F = torch.nn.functional


def _compare(backend_name, x_np, gy_np, k, s, p, d, ceil_mode):
    x = minseg.Tensor(x_np, requires_grad=True)
    with backend.using(backend_name):
        y, idx = max_pool2d(x, k, s, p, d, ceil_mode, return_indices=True)
        y.backward(minseg.Tensor(gy_np))
    tx = torch.tensor(np.ascontiguousarray(x_np), requires_grad=True)
    ty, tidx = F.max_pool2d(tx, k, s, p, d, ceil_mode, return_indices=True)
    ty.backward(torch.from_numpy(gy_np))
    # a max is one of the inputs: exact (NaN where torch has NaN); the same tap, as an int64 index
    np.testing.assert_array_equal(y.numpy(), ty.detach().numpy(), err_msg="y")
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx.numpy(), tidx.numpy(), err_msg="indices")
    # gx: sums of up to ceil(k/s)^2 gradients in float32, in another order
    assert_close(x.grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-4, name="gx")


@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=60)
@given(case=pool_cases(max_planes=2, max_side=10), data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_matches_torch(backend_name, case, data, dtype):
    x, rng = draw_input(data, case["shape"], dtype)  # many ties, NaN and -inf
    gy = rng.standard_normal(case["shape"][:2] + case["out"]).astype(dtype)
    _compare(backend_name, x, gy, *case["args"])


@pytest.mark.parametrize("backend_name", oracle_backends())
def test_non_contiguous_input_with_ceil_mode(backend_name):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 2, 11, 14)).astype(np.float32)
    x = base.transpose(1, 0, 3, 2)[:, :, 1::2, ::2]  # (2, 5, 7, 6)
    assert not x.flags.c_contiguous
    # ceil_mode adds a last, partial window in both axes: Ho = ceil((7 + 2 - 3) / 2) + 1 = 4, Wo = 4
    gy = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
    _compare(backend_name, x, gy, (3, 3), (2, 2), (1, 1), (1, 1), True)
