"""conv2d and conv_transpose2d backward passes are the derivatives: minseg.gradcheck through
minseg.functional (numpy backend, float64) for input, weight and bias, and the adjoint identities
that the reference's gradients must satisfy exactly (up to round-off)."""
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import conv2d, conv_transpose2d
from tests.helpers import reference
from tests.kernels.test_conv2d import arrays, conv_cases

ref = reference("conv2d")

# gradcheck does 2 forwards per element of x, w and b: keep each under ~50 elements
SMALL = dict(max_batch=2, max_channels=3, max_side=5, max_kernel=3, max_elements=50, max_weights=50)


def tensors(shapes, seed):
    rng = np.random.default_rng(seed)
    return [minseg.Tensor(rng.standard_normal(s), requires_grad=True) for s in shapes]


@settings(max_examples=15)
@given(case=conv_cases(**SMALL, symmetric=True), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv2d_gradcheck(case, with_bias, seed):
    stride, pads, dilation, groups = case["args"]
    padding = (pads[0][0], pads[1][0])
    shapes = [case["x_shape"], case["w_shape"]] + ([case["w_shape"][:1]] if with_bias else [])
    inputs = tensors(shapes, seed)
    with backend.using("numpy"):
        assert minseg.gradcheck(
            lambda x, w, *b: conv2d(x, w, b[0] if b else None, stride, padding, dilation, groups), inputs, seed=seed
        )


@settings(max_examples=6)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    groups=st.sampled_from([1, 2]),
    hw=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    seed=st.integers(0, 2**16),
)
def test_conv2d_same_padding_gradcheck(kernel, dilation, groups, hw, seed):
    """padding='same' with even kernels pads one pixel more at the bottom/right."""
    x, w, b = tensors([(1, 2, *hw), (2, 2 // groups, *kernel), (2,)], seed)
    with backend.using("numpy"):
        y = conv2d(x, w, b, padding="same", dilation=dilation, groups=groups)
        assert y.shape == (1, 2, *hw)
        assert minseg.gradcheck(lambda x, w, b: conv2d(x, w, b, padding="same", dilation=dilation, groups=groups), [x, w, b], seed=seed)


@st.composite
def transpose_cases(draw, max_side=4, max_kernel=3):
    """conv_transpose2d problems: symmetric padding, output_padding < max(stride, dilation)."""
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    hw = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    kernel = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    output_padding = tuple(draw(st.integers(0, max(stride[a], dilation[a]) - 1)) for a in range(2))
    out = [(hw[a] - 1) * stride[a] - 2 * padding[a] + dilation[a] * (kernel[a] - 1) + output_padding[a] + 1 for a in range(2)]
    assume(min(out) >= 1)
    return dict(
        x_shape=(draw(st.integers(1, 2)), c_in, *hw),
        w_shape=(c_in, c_out // groups, *kernel),
        y_shape_hw=tuple(out),
        kwargs=dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation),
    )


@settings(max_examples=20)
@given(case=transpose_cases(), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_transpose2d_gradcheck(case, with_bias, seed):
    assume(int(np.prod(case["x_shape"])) <= 50 and int(np.prod(case["w_shape"])) <= 50)
    shapes = [case["x_shape"], case["w_shape"]] + ([(case["w_shape"][1] * case["kwargs"]["groups"],)] if with_bias else [])
    inputs = tensors(shapes, seed)
    kwargs = case["kwargs"]
    with backend.using("numpy"):
        y = conv_transpose2d(*inputs[:2], **kwargs)
        assert y.shape[2:] == case["y_shape_hw"]
        assert minseg.gradcheck(lambda x, w, *b: conv_transpose2d(x, w, b[0] if b else None, **kwargs), inputs, seed=seed)


@settings(max_examples=20)
@given(case=conv_cases(max_channels=4, max_side=8), seed=st.integers(0, 2**16))
def test_reference_gradients_are_adjoints(case, seed):
    """conv2d is linear in x and in w, so for every g:
    <conv(x, w), g> = <x, grad_input(g, w)> = <w, grad_weight(x, g)>."""
    x, w, _, g = arrays(case, np.float64, seed)
    args = case["args"]
    lhs = np.vdot(ref.conv2d_forward(x, w, None, *args), g)
    # float64 sums of a few thousand unit-scale products: round-off ~1e-13 relative
    np.testing.assert_allclose(np.vdot(x, ref.conv2d_grad_input(g, w, x.shape, *args)), lhs, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.vdot(w, ref.conv2d_grad_weight(x, g, w.shape, *args)), lhs, rtol=1e-10, atol=1e-10)
