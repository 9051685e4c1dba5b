"""minseg.functional.batch_norm (every backend) vs torch 2.13: forward, gradients of input,
weight and bias, in training and eval mode, with and without affine parameters, and the
running_mean / running_var updates after a training step."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import batch_norm
from tests.helpers import assert_close, oracle_backends, torch_or_skip

torch = torch_or_skip()
F = torch.nn.functional

# float32: forward within 1e-5 (relative on large values), gradients within 1e-4
FWD, GRAD = dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=40)
@given(
    shape=st.sampled_from([(2, 3), (4, 1), (2, 3, 5), (1, 2, 3, 4), (3, 4, 1, 1), (2, 1, 7, 5), (1, 3, 1, 2)]),
    dtype=st.sampled_from([np.float32, np.float64]),
    training=st.booleans(),
    affine=st.booleans(),
    with_running=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, 1.0]),
    eps=st.sampled_from([1e-5, 1e-3]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_batch_norm_matches_torch(backend_name, shape, dtype, training, affine, with_running, momentum, eps, transposed, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    transposed = transposed and len(shape) == 4
    if transposed:  # a non-contiguous (N, C, H, W) view of (N, C, W, H) memory
        x_np = (rng.standard_normal(shape[:2] + shape[2:][::-1]) * 3 + 2).astype(dtype).swapaxes(2, 3)
    else:
        x_np = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    w_np = rng.standard_normal(c).astype(dtype) if affine else None
    b_np = rng.standard_normal(c).astype(dtype) if affine else None
    with_running = with_running or not training  # eval needs running statistics
    rm_np = rng.standard_normal(c).astype(dtype) if with_running else None
    rv_np = rng.uniform(0.5, 2.0, c).astype(dtype) if with_running else None

    def ours(a):
        return None if a is None else minseg.Tensor(a.copy(), requires_grad=affine)

    x = minseg.Tensor(x_np, requires_grad=True)
    w, b = ours(w_np), ours(b_np)
    rm = None if rm_np is None else minseg.Tensor(rm_np.copy())
    rv = None if rv_np is None else minseg.Tensor(rv_np.copy())
    with backend.using(backend_name):
        y = batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=eps)
        y.backward(minseg.Tensor(gy))

    def theirs(a, grad=False):
        return None if a is None else torch.tensor(a, requires_grad=grad)

    tx = torch.tensor(np.ascontiguousarray(x_np), requires_grad=True)
    tw, tb = theirs(w_np, True), theirs(b_np, True)
    trm, trv = theirs(rm_np), theirs(rv_np)
    ty = F.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=momentum, eps=eps)
    ty.backward(torch.from_numpy(gy))

    assert_close(y.numpy(), ty.detach().numpy(), **FWD, name="y")
    assert_close(x.grad.numpy(), tx.grad.numpy(), **GRAD, name="gx")
    if affine:
        assert_close(w.grad.numpy(), tw.grad.numpy(), **GRAD, name="gweight")
        assert_close(b.grad.numpy(), tb.grad.numpy(), **GRAD, name="gbias")
    if with_running:
        # training: r = (1 - momentum) r + momentum * (batch mean, unbiased batch var); eval: unchanged
        assert_close(rm.numpy(), trm.numpy(), **FWD, name="running_mean")
        assert_close(rv.numpy(), trv.numpy(), **FWD, name="running_var")
        assert rm.dtype == dtype and rv.dtype == dtype
        if not training:
            np.testing.assert_array_equal(rm.numpy(), rm_np)


@pytest.mark.parametrize("backend_name", oracle_backends())
def test_running_statistics_after_several_steps(backend_name):
    """Three training steps then eval, as a BatchNorm layer would run: the same buffers and output."""
    rng = np.random.default_rng(1)
    rm, rv = minseg.Tensor(np.zeros(3, np.float32)), minseg.Tensor(np.ones(3, np.float32))
    trm, trv = torch.zeros(3), torch.ones(3)
    with backend.using(backend_name):
        for _ in range(3):
            x = (rng.standard_normal((4, 3, 5, 5)) * 2 + 1).astype(np.float32)
            batch_norm(minseg.Tensor(x), rm, rv, training=True)
            F.batch_norm(torch.from_numpy(x), trm, trv, training=True)
        x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        y = batch_norm(minseg.Tensor(x), rm, rv, training=False)
    assert_close(rm.numpy(), trm.numpy(), **FWD, name="running_mean")
    assert_close(rv.numpy(), trv.numpy(), **FWD, name="running_var")
    assert_close(y.numpy(), F.batch_norm(torch.from_numpy(x), trm, trv, training=False).numpy(), **FWD, name="eval y")
