"""optim.SGD on every backend (its sgd_step kernel) vs torch.optim.SGD 2.13, several steps, whole tensors.

Each backend's kernels update the parameters: the optimizer runs under
``backend.using(name)`` on NumPy arrays (the cuda kernel under the simulator without
a GPU), from the same parameters and gradients as torch, and every parameter is
compared after every step.
"""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minseg import Tensor, backend, optim
from minseg.nn import Parameter
from tests.helpers import assert_close, oracle_backends, torch_or_skip
from tests.kernels.test_sgd import sgd_options

torch = torch_or_skip()

STEPS = 4
SHAPES = [(3, 4), (1,), (2, 1, 3)]  # two parameters of the optimizer and a one-element one: 16 elements


@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=15)
@given(dtype=st.sampled_from([np.float32, np.float64]), options=sgd_options(), seed=st.integers(0, 2**32 - 1))
@example(dtype=np.float32, options=dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True), seed=0)
def test_sgd_matches_torch(backend_name, dtype, options, seed):
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    ours = [Parameter(p.copy()) for p in p0]
    theirs = [torch.tensor(p.copy(), requires_grad=True) for p in p0]
    opt = optim.SGD(ours, **options)
    topt = torch.optim.SGD(theirs, **options)
    # torch adds with alpha as a fused multiply-add (one rounding fewer than ours) in some of
    # its ~5 operations per element and step; on O(1) values that is at most 1 ulp each:
    # measured up to 8 ulp after 5 steps in float32, so 16 ulp (float32: 1.9e-6).
    tol = 16 * float(np.finfo(dtype).eps)
    for step in range(STEPS):
        for p, tp, g in zip(ours, theirs, grads[step]):
            p.grad, tp.grad = Tensor(g.copy()), torch.from_numpy(g.copy())
        with backend.using(backend_name):
            opt.step()
        topt.step()
        for k, (p, tp) in enumerate(zip(ours, theirs)):
            assert p.data.dtype == dtype
            assert_close(p.data, tp.detach().numpy(), tol, tol, name=f"parameter {k} after step {step + 1}")
            np.testing.assert_array_equal(p.grad.data, grads[step][k], err_msg="the step wrote the gradient")
        if options["momentum"]:
            for k, tp in enumerate(theirs):
                buf = opt.state[k]["momentum_buffer"]
                assert_close(buf, topt.state[tp]["momentum_buffer"].numpy(), tol, tol, name=f"buffer {k} after step {step + 1}")
        else:
            assert all("momentum_buffer" not in opt.state[k] for k in range(len(ours)))
