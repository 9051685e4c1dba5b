"""minseg.functional.conv2d / conv_transpose2d (every backend) vs torch.nn.functional: the output
and the input, weight and bias gradients, whole tensors, for drawn shapes and hyper-parameters
('same' with its asymmetric padding, 'valid', groups, dilation, output_padding) and inputs that
are non-contiguous views.

Tolerances: float32 forward 1e-5 (abs, or relative on large values), gradients 1e-4; the
sums have at most ~10^2 terms (the forward's Cg*kh*kw <= 128 weights of an output channel,
grad_weight's N*Ho*Wo <= 2*13*13), which in float32 differ between summation orders by ~1e-6.
float64 is held to the same bounds (it passes them with a wide margin).
"""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import conv2d, conv_transpose2d
from tests.grad.test_conv_grad import transpose_cases
from tests.helpers import assert_close, oracle_backends, torch_or_skip
from tests.kernels.test_conv2d import conv_cases, conv_out

torch = torch_or_skip()
F = torch.nn.functional
DTYPES = st.sampled_from([np.float32, np.float64])


def draw_array(rng, shape, dtype, transposed):
    """A standard-normal array; with ``transposed``, a non-contiguous view (last two axes swapped)."""
    if transposed:
        return rng.standard_normal((*shape[:-2], shape[-1], shape[-2])).astype(dtype).swapaxes(-1, -2)
    return rng.standard_normal(shape).astype(dtype)


def compare(backend_name, minseg_fn, torch_fn, x, w, b, rng):
    """Run both, backward a random gy through both, compare y and every gradient."""
    inputs = [minseg.Tensor(a, requires_grad=True) for a in (x, w, b) if a is not None]
    with backend.using(backend_name):
        y = minseg_fn(*inputs)
        gy = rng.standard_normal(y.shape).astype(x.dtype)
        y.backward(minseg.Tensor(gy))
    t_inputs = [torch.tensor(np.ascontiguousarray(a), requires_grad=True) for a in (x, w, b) if a is not None]
    ty = torch_fn(*t_inputs)
    ty.backward(torch.from_numpy(gy))
    assert y.dtype == x.dtype
    assert_close(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5, name="y")
    for name, t, tt in zip(("gx", "gw", "gb"), inputs, t_inputs):
        assert_close(t.grad.numpy(), tt.grad.numpy(), rtol=1e-4, atol=1e-4, name=name)


@pytest.mark.parametrize("backend_name", oracle_backends())
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's speed note
@settings(max_examples=25)  # per backend: 75 draws in all (tests/kernels and tests/cuda compare each backend more)
@given(
    case=conv_cases(symmetric=True),
    padding_mode=st.sampled_from(["ints", "same", "valid"]),
    with_bias=st.booleans(),
    transposed=st.tuples(st.booleans(), st.booleans()),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_conv2d_matches_torch(backend_name, case, padding_mode, with_bias, transposed, dtype, seed):
    stride, pads, dilation, groups = case["args"]
    if padding_mode == "ints":
        padding = (pads[0][0], pads[1][0])
    elif padding_mode == "same":
        padding, stride = "same", (1, 1)  # torch allows 'same' only with stride 1
    else:
        padding = "valid"
        assume(min(conv_out(case["x_shape"][2 + a], (0, 0), dilation[a], case["w_shape"][2 + a], stride[a]) for a in range(2)) >= 1)
    rng = np.random.default_rng(seed)
    x = draw_array(rng, case["x_shape"], dtype, transposed[0])
    w = draw_array(rng, case["w_shape"], dtype, transposed[1])
    b = rng.standard_normal(case["w_shape"][0]).astype(dtype) if with_bias else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    compare(backend_name, lambda *t: conv2d(*t, **kwargs), lambda *t: F.conv2d(*t, **kwargs), x, w, b, rng)


@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=20)
@given(
    case=transpose_cases(max_side=6),
    with_bias=st.booleans(),
    transposed=st.tuples(st.booleans(), st.booleans()),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_conv_transpose2d_matches_torch(backend_name, case, with_bias, transposed, dtype, seed):
    rng = np.random.default_rng(seed)
    x = draw_array(rng, case["x_shape"], dtype, transposed[0])
    w = draw_array(rng, case["w_shape"], dtype, transposed[1])
    c_out = case["w_shape"][1] * case["kwargs"]["groups"]
    b = rng.standard_normal(c_out).astype(dtype) if with_bias else None
    kwargs = case["kwargs"]
    compare(backend_name, lambda *t: conv_transpose2d(*t, **kwargs), lambda *t: F.conv_transpose2d(*t, **kwargs), x, w, b, rng)


@pytest.mark.parametrize("backend_name", oracle_backends())
def test_same_padding_puts_the_extra_pixel_bottom_right(backend_name):
    """A 2x2 kernel of ones with padding='same': y[i, j] = x[i, j] + x[i, j+1] + x[i+1, j] + x[i+1, j+1]
    (zero beyond the last row/column), as torch."""
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    w = np.ones((1, 1, 2, 2))
    with backend.using(backend_name):
        y = conv2d(minseg.Tensor(x), minseg.Tensor(w), padding="same").numpy()
    xp = np.pad(x[0, 0], ((0, 1), (0, 1)))
    expected = xp[:-1, :-1] + xp[:-1, 1:] + xp[1:, :-1] + xp[1:, 1:]
    assert_close(y[0, 0], expected, rtol=0, atol=0)
    assert_close(y, F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding="same").numpy(), rtol=0, atol=0)
