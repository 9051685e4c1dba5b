"""Tensor and autograd: the classic bugs of a hand-written engine, and gradcheck itself."""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minseg
from minseg import Tensor, gradcheck, no_grad, tensor
from tests.helpers import torch_or_skip


def t64(a, requires_grad=True):
    return tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad)


def test_tensor_dtypes_follow_torch():
    assert tensor([1.5, 2.0]).dtype == np.float32  # Python floats -> float32
    assert tensor(np.zeros(3)).dtype == np.float64  # an ndarray keeps its dtype
    assert tensor([1, 2]).dtype == np.int64
    assert tensor([1, 2], dtype=np.float64).dtype == np.float64
    with pytest.raises(TypeError, match="floating-point"):
        tensor([1, 2], requires_grad=True)


def test_tensor_copies_its_input():
    a = np.ones(3, dtype=np.float32)
    t = tensor(a)
    a[0] = 5
    assert t.numpy()[0] == 1


def test_non_leaf_reused_twice_accumulates():
    # y = x*2 is used twice: dL/dx must collect both paths, 2*(3) + 2*(5) per element.
    x = t64([1.0, 2.0])
    y = x * 2
    z = (y * 3 + y * 5).sum()
    z.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [16.0, 16.0])


def test_diamond_graph_runs_each_backward_once_with_full_gradient():
    # a -> b, c -> d: b's backward must see the sum of both uses before it runs.
    a = t64([3.0])
    b = a * a  # db/da = 2a
    c = b * 2
    d = (b + c).sum()  # dd/db = 3
    d.backward()
    np.testing.assert_allclose(a.grad.numpy(), [3 * 2 * 3.0])


def test_leaf_grads_accumulate_across_backward_calls():
    x = t64([1.0, -2.0])
    (x * x).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * np.array([1.0, -2.0]) + 3)


def test_grad_buffer_is_owned_not_aliased():
    # Add passes the same gradient array to both inputs; accumulating into one
    # leaf's .grad must not change the other's.
    a, b = t64([1.0]), t64([2.0])
    (a + b).sum().backward()
    (a * 5).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), [6.0])
    np.testing.assert_allclose(b.grad.numpy(), [1.0])


class _Handing(minseg.autograd.Function):
    """y = x; its backward hands out ``ctx.grad_of_x(g)``: an array the test chooses, as a Function may."""

    @staticmethod
    def forward(ctx, x, make):
        ctx.make = make
        return x.copy()

    @staticmethod
    def backward(ctx, g):
        return ctx.make(g), None


def _two_uses(first_use, second_use=lambda g: g * 5.0):
    """x used twice; backward of sum(y) with y = first_use-path + second_use-path. Returns x."""
    x = t64([1.0, 2.0, 3.0])
    y = _Handing.apply(x, first_use) * 1.0 + _Handing.apply(x, second_use) * 1.0
    y.sum().backward()
    return x


def test_a_node_used_twice_sums_into_a_private_gradient_in_place():
    # Both uses of x hand back a fresh array that only the walk holds: one is added into the
    # other (x.grad is one of them, no third array), and the sum is exact. Arrays a Function
    # returns come from NumPy (base None) or from kernels/memory.py (the one view of a buffer).
    import weakref

    from kernels.memory import empty_aligned

    def aligned(g, factor):
        a = empty_aligned(g.shape, g.dtype)
        a[...] = g * factor
        return a

    for make in (lambda g, factor: g * factor, aligned):
        handed = []

        def tracked(factor, make=make):
            def backward(g):
                a = make(g, factor)
                handed.append(weakref.ref(a))
                return a
            return backward

        x = _two_uses(tracked(2.0), tracked(5.0))
        np.testing.assert_array_equal(x.grad.numpy(), [7.0, 7.0, 7.0])
        assert any(x.grad.data is ref() for ref in handed)


def test_in_place_sum_is_an_optimisation_the_result_cannot_see():
    # Whatever else holds a partial gradient -- the test's own reference, an array another
    # gradient is a view of, the caller's grad, a retained .grad -- is never written: the sum
    # goes to a fresh array, and every held array keeps its values.
    kept = []

    def keep(g):
        a = g * 2.0
        kept.append(a)
        return a

    def view_of_shared(g):
        shared = np.concatenate([g * 3.0, g * 3.0])
        kept.append(shared)
        return shared[: g.size]

    for first_use in (keep, view_of_shared, lambda g: g):  # the last hands back the caller's array
        kept.clear()
        x = t64([1.0, 2.0])
        y = _Handing.apply(x, first_use) + _Handing.apply(x, lambda g: g * 5.0)
        y.retain_grad()
        caller = np.ones(2)
        y.backward(caller)
        factor = {keep: 2.0, view_of_shared: 3.0}.get(first_use, 1.0)
        np.testing.assert_array_equal(x.grad.numpy(), [factor + 5.0] * 2)
        np.testing.assert_array_equal(caller, [1.0, 1.0])
        np.testing.assert_array_equal(y.grad.numpy(), [1.0, 1.0])
        for a in kept:
            np.testing.assert_array_equal(a, np.full(a.shape, factor))


def test_in_place_sum_leaves_a_shared_buffer_alone():
    # A view of a buffer that another array also views is not private: adding into it would
    # change the other view, so the sum goes to a fresh array.
    other = []

    def two_views(g):
        buf = np.zeros(2 * g.size)
        other.append(buf[: g.size])
        view = buf[: g.size]
        view[...] = g * 2.0
        return view

    x = _two_uses(two_views)
    np.testing.assert_array_equal(x.grad.numpy(), [7.0, 7.0, 7.0])
    np.testing.assert_array_equal(other[0], [2.0, 2.0, 2.0])


def test_backward_twice_through_freed_graph_raises():
    x = t64([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = t64([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * 2 * np.array([1.0, 2.0]))


def test_backward_needs_grad_for_non_scalar():
    x = t64([1.0, 2.0])
    with pytest.raises(RuntimeError, match="non-scalar"):
        (x * 2).backward()
    with pytest.raises(ValueError, match="shape"):
        (x * 2).backward(np.ones(3))


def test_no_grad_records_nothing():
    x = t64([1.0])
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y.is_leaf
    assert minseg.is_grad_enabled()


def test_detach_cuts_the_graph():
    x = t64([2.0])
    y = (x.detach() * x).sum()
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [2.0])


def test_retain_grad_keeps_non_leaf_gradient():
    x = t64([1.0, 2.0])
    y = x * 3
    y.retain_grad()
    (y * y).sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), 2 * 3 * np.array([1.0, 2.0]))


def test_broadcast_error_is_clear():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\)"):
        t64(np.ones((2, 3))) + t64(np.ones(4))
    with pytest.raises(ValueError, match="inner dimensions"):
        t64(np.ones((2, 3))) @ t64(np.ones((2, 3)))


shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3)


@st.composite
def broadcastable_pair(draw):
    """Two shapes that broadcast: b is a with some axes set to 1 and some leading axes dropped."""
    a = draw(shapes)
    b = [1 if draw(st.booleans()) else n for n in a]
    b = b[draw(st.integers(0, len(b) - 1)) :]
    if draw(st.booleans()):
        a, b = tuple(b), a
    return tuple(a), tuple(b)


def _values(shape, seed, positive=False):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape)
    return np.abs(v) + 0.5 if positive else v


@given(broadcastable_pair(), st.sampled_from(["add", "sub", "mul", "div", "pow"]), st.integers(0, 2**16))
# a size-1 axis broadcast against extra leading axes: the gradient of (3, 1) sums over the new axis 0
# *and* over axis 2 of the (2, 3, 3) result -- an unbroadcast that forgets to shift the size-1 axes
# past the leading ones sums axis 1 instead and still has the right shape; draws rarely pair the two
@example(((2, 3, 3), (3, 1)), "add", 0)
@example(((3, 1), (2, 3, 3)), "mul", 1)
@example(((2, 1, 4, 1), (3, 1, 2)), "div", 2)
def test_broadcasting_binary_ops_gradcheck(pair, op, seed):
    sa, sb = pair
    positive = op in ("div", "pow")
    a, b = t64(_values(sa, seed, positive)), t64(_values(sb, seed + 1, positive))
    fn = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "pow": lambda a, b: a**b,
    }[op]
    assert gradcheck(fn, [a, b])


@given(
    st.sampled_from([((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 4)), ((2, 3), (3, 4)), ((2, 1, 2, 3), (4, 3, 2))]),
    st.integers(0, 2**16),
)
def test_matmul_gradcheck(shapes, seed):
    a, b = t64(_values(shapes[0], seed)), t64(_values(shapes[1], seed + 1))
    assert gradcheck(lambda a, b: a @ b, [a, b])


@given(shapes, st.integers(0, 2**16), st.booleans(), st.data())
def test_reductions_and_views_gradcheck(shape, seed, keepdim, data):
    x = t64(_values(shape, seed, positive=True))
    dim = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    perm = data.draw(st.permutations(range(len(shape))))
    assert gradcheck(lambda x: x.sum(dim, keepdim=keepdim), [x])
    assert gradcheck(lambda x: x.mean(dim, keepdim=keepdim), [x])
    assert gradcheck(lambda x: x.permute(perm).reshape(-1).exp(), [x])
    assert gradcheck(lambda x: (-x.log()) ** 2, [x])
    assert gradcheck(lambda x: (2.0 / x - 1.0) * 3.0, [x])


def test_getitem_gradient_accumulates_repeated_indices():
    x = t64([1.0, 2.0, 3.0])
    y = x[np.array([0, 0, 2])].sum()
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 0.0, 1.0])
    assert gradcheck(lambda x: x[1:, None] * x[:2], [t64(_values((3,), 0))])


def test_scalar_does_not_promote_float32():
    x = tensor(np.ones(3, np.float32), requires_grad=True)
    y = x * 2.5 + 1
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_gradcheck_catches_wrong_backward():
    class WrongSquare(minseg.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return (g * x,)  # should be 2 x g

    x = t64([1.0, 2.0, 3.0])
    with pytest.raises(minseg.GradcheckError, match=r"input 0.*element \(\d,\)"):
        gradcheck(lambda x: WrongSquare.apply(x), [x])


def test_gradcheck_requires_float64():
    x = tensor(np.ones(2, np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x * 2, [x])


def test_function_returning_wrong_number_of_grads_is_reported():
    class Bad(minseg.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, g):
            return (g,)

    y = Bad.apply(t64([1.0]), t64([2.0])).sum()
    with pytest.raises(RuntimeError, match="returned 1 gradients for 2 inputs"):
        y.backward()


def test_oracle_autograd_matches_torch():
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5))
    a, b = t64(a_np), t64(b_np)
    ta = torch.tensor(a_np, requires_grad=True)
    tb = torch.tensor(b_np, requires_grad=True)
    out = ((a @ b).exp().mean(1, keepdim=True) / (b.sum(0) ** 2 + 1)).log().sum()
    tout = ((ta @ tb).exp().mean(1, keepdim=True) / (tb.sum(0) ** 2 + 1)).log().sum()
    out.backward()
    tout.backward()
    np.testing.assert_allclose(out.item(), tout.item(), rtol=1e-12)
    np.testing.assert_allclose(a.grad.numpy(), ta.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.grad.numpy(), tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_repr_and_basic_accessors():
    x = tensor([[1.0, 2.0]], requires_grad=True)
    assert "requires_grad=True" in repr(x)
    assert x.shape == (1, 2) and x.size(1) == 2 and x.numel() == 2 and len(x) == 1
    assert isinstance(x.argmax(1), Tensor)
    assert x.transpose(0, 1).shape == (2, 1)


def test_grad_is_independent_of_the_callers_upstream_gradient():
    x = t64([1.0, 2.0])
    g = np.array([3.0, 4.0])
    (x + 0.0).backward(g)
    g[:] = 7.0
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 4.0])


def test_grad_of_a_broadcast_backward_is_writeable():
    # sum's backward broadcasts g (a stride-0 view); .grad must still take in-place updates
    x = t64([1.0, 2.0, 3.0])
    x.sum().backward()
    x.grad.data *= 0.5  # e.g. gradient clipping
    np.testing.assert_array_equal(x.grad.numpy(), [0.5, 0.5, 0.5])


def test_shared_gradient_arrays_are_not_aliased_between_leaves():
    # Add gives both inputs the same array; a view of it reaches the second leaf
    a, b = t64(np.ones((2, 3))), t64(np.ones(3))
    (a + b).sum().backward()
    a.grad.data += 1
    np.testing.assert_array_equal(b.grad.numpy(), [2.0, 2.0, 2.0])


def test_clear_errors_for_bad_dims():
    x = t64(np.ones((2, 3)))
    with pytest.raises(ValueError, match="out of range"):
        x.transpose(0, 5)
    with pytest.raises(ValueError, match="out of range"):
        x.argmax(5)
    with pytest.raises(ValueError, match="twice"):
        x.sum((0, 0))
    with pytest.raises(ValueError, match="batch dimensions"):
        t64(np.ones((2, 3, 4))) @ t64(np.ones((3, 4, 5)))
