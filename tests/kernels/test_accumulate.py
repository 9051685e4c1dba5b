"""accumulate kernels: every backend module vs the NumPy reference, bit for bit, in place; and the walk uses it.

``accumulate(total, part)`` writes ``total`` (``total += part``) and only reads ``part``.
The tests run the reference and a backend on copies of the same ``total`` and compare
the whole result, and check that ``part`` comes back untouched.

Exactness, tolerance 0: every element is one IEEE addition, one rounding, nothing to
fuse (no product, so no multiply-add on a GPU either) and no order to choose. So the
comparison is of bit patterns: -0.0 differs from 0.0, and an overflow must give the
same inf. The one exception is NaN, whose payload and sign IEEE leaves to the hardware
(x86 makes inf + -inf a negative NaN, a GPU its canonical positive one): a NaN must be
a NaN where the reference has one, whatever its bits.
"""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import config

import minseg
import minseg.functional as F
from kernels import cuda_common as cc
from kernels.accumulate import cpu as acc_cpu
from minseg import backend
from minseg.backend import to_numpy
from tests.helpers import kernel_modules, load, reference

REF = reference("accumulate")
MODULES = kernel_modules("accumulate")
# The special values overflow and make inf - inf on purpose; NumPy (the reference, and the simulator's
# scalars) warns of that, the point of the test rather than a problem.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}
# Values where an addition is not plain arithmetic: signed zeros (0.0 + -0.0 = 0.0, -0.0 + -0.0 = -0.0),
# infinities (inf + -inf = NaN), NaN (absorbs everything), the largest finite value (max + max overflows
# to inf) and the smallest subnormal (sums of subnormals must not be flushed to zero).
SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, "max", "-max", "tiny"]


def assert_same_bits(actual, expected, name):
    """Equal bit for bit, except that a NaN only has to be a NaN (see the module docstring)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (name, actual.shape, actual.dtype)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan, err_msg=f"{name}: NaN where the reference has none, or none where it has one")
    u = UINT[expected.dtype]
    differ = actual.view(u)[~nan] != expected.view(u)[~nan]
    assert not differ.any(), f"{name}: {differ.sum()} of {expected.size} elements differ, e.g. {actual[~nan][differ][:5]} != {expected[~nan][differ][:5]}"


def draw_problem(shape, dtype, special_rate, seed):
    """total and part of ``shape``; a fraction ``special_rate`` of their elements replaced by SPECIALS."""
    rng = np.random.default_rng(seed)
    info = np.finfo(dtype)
    specials = np.array([{"max": info.max, "-max": -info.max, "tiny": info.smallest_subnormal}.get(v, v) for v in SPECIALS], dtype)
    arrays = []
    for _ in range(2):
        a = rng.standard_normal(shape).astype(dtype)
        mask = rng.random(shape) < special_rate
        a[mask] = rng.choice(specials, size=int(mask.sum()))
        arrays.append(a)
    return arrays


def check_against_reference(modname, shape, dtype, special_rate, seed):
    total0, part = draw_problem(shape, dtype, special_rate, seed)
    want = total0.copy()
    assert REF.accumulate(want, part) is None
    mod = load(modname)
    total = total0.copy()
    part_before = part.copy()
    if modname.endswith(".cuda"):  # the kernel updates an array of the device in place (NumPy's under the simulator)
        total, part = cc.xp.asarray(total), cc.xp.asarray(part)
    assert mod.accumulate(total, part) is None
    got = to_numpy(total)
    assert_same_bits(got, want, "total")
    np.testing.assert_array_equal(to_numpy(part).view(UINT[part_before.dtype]), part_before.view(UINT[part_before.dtype]),
                                  err_msg="accumulate wrote part")


@pytest.mark.parametrize("modname", MODULES)
@settings(max_examples=25)
@given(
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple),  # 0-d, empty, up to 2401 elements
    dtype=st.sampled_from([np.float32, np.float64]),
    special_rate=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
@example(shape=(), dtype=np.float32, special_rate=0.0, seed=0)  # 0-d: one element
@example(shape=(1,), dtype=np.float64, special_rate=1.0, seed=1)  # one element, a special value
@example(shape=(0, 3), dtype=np.float32, special_rate=0.0, seed=2)  # no elements: nothing to do
@example(shape=(4, 5), dtype=np.float32, special_rate=1.0, seed=3)  # all specials: inf + -inf, NaN, overflow
def test_accumulate_matches_reference(modname, shape, dtype, special_rate, seed):
    if modname.endswith(".cuda") and config.ENABLE_CUDASIM:
        shape = shape[-2:]  # at most 49 elements: one simulated thread each, in one block
    check_against_reference(modname, shape, dtype, special_rate, seed)


# Sizes around the cpu kernel's serial/parallel switch, and a parallel run whose last block is partial.
CPU_SIZES = [acc_cpu.PARALLEL_MIN - 1, acc_cpu.PARALLEL_MIN, acc_cpu.PARALLEL_MIN + acc_cpu.BLOCK + 3]


@pytest.mark.parametrize("size", CPU_SIZES)
@settings(max_examples=3)
@given(dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_cpu_serial_and_parallel_paths_match_reference(size, dtype, seed):
    check_against_reference("kernels.accumulate.cpu", (size,), dtype, 0.01, seed)


@pytest.mark.parametrize("modname", [pytest.param("kernels.accumulate.reference", id="numpy")] + MODULES)
def test_accumulate_values(modname):
    """Hand-computed sums: exact values, a signed zero, an overflow, inf + -inf."""
    mod = load(modname)
    total = np.array([1.5, -0.0, 3e38, np.inf, 2.0], np.float32)
    part = np.array([0.25, -0.0, 3e38, -np.inf, np.nan], np.float32)
    if modname.endswith(".cuda"):
        total, part = cc.xp.asarray(total), cc.xp.asarray(part)
    mod.accumulate(total, part)
    got = to_numpy(total)
    np.testing.assert_array_equal(got, [1.75, 0.0, np.inf, np.nan, np.nan])
    assert np.signbit(got[1]), "-0.0 + -0.0 is -0.0"


# ------------------------------------------------------------------ the backward walk uses the kernel


def _skip_graph(x, weight):
    """U-Net's skip in small: y = relu(x) feeds both a 2x2 max-pool (then upsampled back) and the
    concatenation, so the walk sums y's two partial gradients (each a fresh array)."""
    y = F.relu(x)
    up = F.interpolate(F.max_pool2d(y, 2), scale_factor=2, mode="nearest")
    return (F.cat([y, up], 1) * weight).sum()


def _grad_of_x(x0, weight):
    x = minseg.tensor(x0, requires_grad=True)
    _skip_graph(x, minseg.tensor(weight)).backward()
    return x.grad.numpy()


def test_backward_walk_sums_a_reused_node_with_the_kernel(monkeypatch):
    """Under the cpu backend the walk's in-place sum calls the cpu kernel, and x's gradient is
    the same, bit for bit, as with NumPy's ``+=`` (the reference) in its place."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    weight = rng.standard_normal((2, 6, 6, 6)).astype(np.float32)
    with backend.using("cpu") as kernels:
        calls = []

        def counting(total, part):
            calls.append((total.shape, total.dtype))
            return acc_cpu.accumulate(total, part)

        monkeypatch.setitem(kernels.functions, "accumulate", counting)
        got = _grad_of_x(x0, weight)
        assert calls == [((2, 3, 6, 6), np.dtype(np.float32))], calls  # y's two partial gradients, once
        monkeypatch.setitem(kernels.functions, "accumulate", REF.accumulate)
        want = _grad_of_x(x0, weight)
    assert_same_bits(got, want, "x.grad")
    # and the gradient itself, from the chain rule by hand: relu passes where x > 0 the sum of the
    # concatenation's slice of weight and the pooled path's (weight summed over each 2x2 block, sent to its max)
    y = np.maximum(x0, 0)
    wu = weight[:, 3:].reshape(2, 3, 3, 2, 3, 2).sum((3, 5))
    win = y.reshape(2, 3, 3, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 3, 3, 4)
    first_max = np.eye(4, dtype=np.float32)[win.argmax(-1)] * wu[..., None]
    pooled = first_max.reshape(2, 3, 3, 3, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 6, 6)
    np.testing.assert_allclose(got, (weight[:, :3] + pooled) * (x0 > 0), rtol=1e-6, atol=1e-6)


class _Strided(minseg.autograd.Function):
    """y = x; its backward hands out 5 g as a strided view (every other element of a wider array)."""

    @staticmethod
    def forward(ctx, x):
        return x.copy()

    @staticmethod
    def backward(ctx, g):
        wide = np.repeat(g * 5.0, 2, axis=-1)
        return wide[..., ::2]


def test_backward_walk_falls_back_to_numpy_for_a_strided_part(monkeypatch):
    """A partial gradient that is not C-contiguous is added by NumPy's ``+=`` (the kernels index
    flat memory), with the same result."""
    with backend.using("cpu") as kernels:
        calls = []
        monkeypatch.setitem(kernels.functions, "accumulate", lambda total, part: calls.append(1))
        x = minseg.tensor(np.array([[1.0, -2.0, 3.0]]), requires_grad=True)
        (_Strided.apply(x) * 1.0 + F.relu(x) * 1.0).sum().backward()
    assert calls == []
    np.testing.assert_array_equal(x.grad.numpy(), [[6.0, 5.0, 6.0]])
