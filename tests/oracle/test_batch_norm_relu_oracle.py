"""minseg.functional.batch_norm_relu (every backend) vs torch 2.13's relu(batch_norm(...)):
forward, gradients of input, weight and bias, running statistics, in training and eval mode,
including inputs whose normalised value is exactly 0 (torch's relu has gradient 0 there)."""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import batch_norm_relu
from tests.helpers import assert_close, oracle_backends, torch_or_skip
from tests.oracle.test_batch_norm_oracle import FWD, GRAD  # the batch norm's tolerances, justified there

torch = torch_or_skip()
F = torch.nn.functional



@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=20)
@given(
    shape=st.sampled_from([(2, 3), (2, 3, 5), (1, 2, 3, 4), (3, 4, 1, 1), (2, 1, 7, 5)]),
    dtype=st.sampled_from([np.float32, np.float64]),
    training=st.booleans(),
    affine=st.booleans(),
    exact_zeros=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
@example(shape=(2, 1, 7, 5), dtype=np.float32, training=False, affine=True, exact_zeros=True, seed=0)
def test_batch_norm_relu_matches_torch(backend_name, shape, dtype, training, affine, exact_zeros, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    if exact_zeros:
        # eval mode with running mean 0 and no bias: the zeros of x normalise to exactly 0 on every
        # backend. (In training the batch mean of such data is exact only up to each backend's
        # summation order -- a float64 merge of chunk means can leave 1e-17 for 0 -- so a zero of
        # x may normalise to +-1e-17 instead; tests/kernels/test_batch_norm_relu.py covers exact
        # zeros in training with the reference's statistics.)
        training = False
        x_np = rng.integers(-2, 3, shape).astype(dtype)
        x_np.flat[0] = 0
    else:
        x_np = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    w_np = rng.standard_normal(c).astype(dtype) if affine else None
    b_np = rng.standard_normal(c).astype(dtype) if affine and not exact_zeros else None
    rm_np = np.zeros(c, dtype) if exact_zeros else rng.standard_normal(c).astype(dtype)
    rv_np = rng.uniform(0.5, 2.0, c).astype(dtype)

    def ours(a, grad):
        return None if a is None else minseg.Tensor(a.copy(), requires_grad=grad)

    x = minseg.Tensor(x_np, requires_grad=True)
    w, b, rm, rv = ours(w_np, True), ours(b_np, True), ours(rm_np, False), ours(rv_np, False)
    with backend.using(backend_name):
        y = batch_norm_relu(x, rm, rv, w, b, training=training)
        y.backward(minseg.Tensor(gy))

    def theirs(a, grad):
        return None if a is None else torch.tensor(a, requires_grad=grad)

    tx = torch.tensor(x_np, requires_grad=True)
    tw, tb, trm, trv = theirs(w_np, True), theirs(b_np, True), theirs(rm_np, False), theirs(rv_np, False)
    ty = F.relu(F.batch_norm(tx, trm, trv, tw, tb, training=training))
    ty.backward(torch.from_numpy(gy))

    if exact_zeros:
        assert (ty.detach().numpy()[x_np == 0] == 0).all()  # the case this example is for
    assert_close(y.numpy(), ty.detach().numpy(), **FWD, name="y")
    assert_close(x.grad.numpy(), tx.grad.numpy(), **GRAD, name="gx")
    if w is not None:
        assert_close(w.grad.numpy(), tw.grad.numpy(), **GRAD, name="gweight")
    if b is not None:
        assert_close(b.grad.numpy(), tb.grad.numpy(), **GRAD, name="gbias")
    assert_close(rm.numpy(), trm.numpy(), **FWD, name="running_mean")
    assert_close(rv.numpy(), trv.numpy(), **FWD, name="running_var")
