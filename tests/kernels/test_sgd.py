"""sgd kernels: every backend module vs the NumPy reference, step after step, in place.

``sgd_step`` writes its inputs (as only ``accumulate`` also does): the tests run the reference and
a backend on copies of the same parameter and momentum buffer, for several steps (the
first writes b = g, the later ones mix the old buffer in), and compare the whole
parameter and buffer after every step. The gradient must come back untouched.

Exactness: the cpu kernel has no fastmath, so LLVM keeps every rounding of the
reference in the same order (no fused multiply-adds): equal bit for bit. The cuda
kernel under the simulator computes in NumPy scalars of the array's dtype: also
exact. On a GPU, NVVM fuses ``a * b + c`` (one rounding instead of two): see
``tolerance``.
"""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import config

from kernels import cuda_common as cc
from kernels.sgd import cpu as sgd_cpu
from minseg.backend import to_numpy
from tests.helpers import assert_close, kernel_modules, load, reference

REF = reference("sgd")
MODULES = kernel_modules("sgd")


@st.composite
def sgd_options(draw):
    """torch.optim.SGD's keyword arguments, every valid combination: momentum 0 or not, dampening
    (0, partial, 1: the buffer then stops taking in the gradient), nesterov (momentum > 0, dampening 0),
    weight decay 0 or not, lr 0 (nothing moves) or not."""
    momentum = draw(st.one_of(st.just(0.0), st.just(0.9), st.floats(0.01, 1.0)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)))
    weight_decay = draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.5)))
    lr = draw(st.one_of(st.just(0.0), st.floats(1e-3, 1.0)))
    return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)


def tolerance(modname, dtype):
    """(rtol, atol) of a backend against the reference.

    Exact, except the cuda kernel on a real GPU: every fused multiply-add there skips
    one rounding of an O(1) product (at most 1 ulp each), about 5 per element and step,
    over at most 4 steps of O(1) values: 32 ulp bounds it.
    """
    if modname.endswith(".cuda") and not config.ENABLE_CUDASIM:
        eps = float(np.finfo(dtype).eps)
        return 32 * eps, 32 * eps
    return 0, 0


def run_steps(mod, p0, grads, options):
    """p and b (as NumPy arrays) after each of ``len(grads)`` steps of ``mod.sgd_step`` on a copy of ``p0``.

    The buffer starts as garbage (NaN): the first step must overwrite it with g, as the
    optimizer allocates it with empty_like. Checks that every gradient stays unchanged.
    """
    p = p0.copy()
    b = None
    if options["momentum"]:
        b = p0.copy()
        b.fill(np.nan)
    out = []
    for step, g in enumerate(grads):
        g_before = to_numpy(g).copy()
        assert mod.sgd_step(p, g, b, **options, first_step=step == 0) is None
        np.testing.assert_array_equal(to_numpy(g), g_before, err_msg=f"step {step + 1} wrote the gradient")
        out.append((to_numpy(p).copy(), None if b is None else to_numpy(b).copy()))
    return out


def draw_problem(shape, dtype, steps, strided_grad, seed):
    """p0 and ``steps`` gradients of ``shape``; with ``strided_grad`` the gradients are non-contiguous views."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(dtype)
    if not strided_grad:
        return p0, [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]
    # every other element of a twice-as-long last axis: a view with strides, for any ndim
    wide = (*shape[:-1], 2 * shape[-1])
    return p0, [rng.standard_normal(wide).astype(dtype)[..., ::2] for _ in range(steps)]


def check_against_reference(modname, shape, dtype, options, steps, strided_grad, seed):
    mod = load(modname)
    p0, grads = draw_problem(shape, dtype, steps, strided_grad, seed)
    rtol, atol = tolerance(modname, dtype)
    want = run_steps(REF, p0, grads, options)
    if modname.endswith(".cuda"):  # the kernel updates arrays of the device in place (NumPy's under the simulator)
        p0, grads = cc.xp.asarray(p0), [cc.xp.asarray(g) for g in grads]
    got = run_steps(mod, p0, grads, options)
    for step, ((p, b), (p_ref, b_ref)) in enumerate(zip(got, want)):
        assert p.dtype == dtype
        assert_close(p, p_ref, rtol, atol, name=f"param after step {step + 1}")
        if options["momentum"]:
            assert_close(b, b_ref, rtol, atol, name=f"momentum buffer after step {step + 1}")
        else:
            assert b is None


@pytest.mark.parametrize("modname", MODULES)
@settings(max_examples=30)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple),  # 1 to 2401 elements
    dtype=st.sampled_from([np.float32, np.float64]),
    options=sgd_options(),
    steps=st.integers(1, 4),
    strided_grad=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
# one element, momentum with partial dampening, three steps
@example(shape=(1,), dtype=np.float32, options=dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1, nesterov=False),
         steps=3, strided_grad=False, seed=0)
# nesterov with weight decay, a strided gradient, float64
@example(shape=(3, 5), dtype=np.float64, options=dict(lr=0.5, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True),
         steps=3, strided_grad=True, seed=1)
# plain SGD: no buffer at all
@example(shape=(2, 3, 4), dtype=np.float32, options=dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
         steps=2, strided_grad=False, seed=2)
def test_sgd_step_matches_reference(modname, shape, dtype, options, steps, strided_grad, seed):
    if modname.endswith(".cuda") and config.ENABLE_CUDASIM:
        shape = shape[-2:]  # at most 49 elements: one simulated thread each, in one block
    check_against_reference(modname, shape, dtype, options, steps, strided_grad, seed)


# Sizes around the cpu kernel's serial/parallel switch, and a parallel run whose last block is partial.
CPU_SIZES = [sgd_cpu.PARALLEL_MIN - 1, sgd_cpu.PARALLEL_MIN, sgd_cpu.PARALLEL_MIN + sgd_cpu.BLOCK + 3]


@pytest.mark.parametrize("size", CPU_SIZES)
@settings(max_examples=4)
@given(dtype=st.sampled_from([np.float32, np.float64]), options=sgd_options(), seed=st.integers(0, 2**32 - 1))
def test_cpu_serial_and_parallel_paths_match_reference(size, dtype, options, seed):
    check_against_reference("kernels.sgd.cpu", (size,), dtype, options, 2, False, seed)


@pytest.mark.parametrize("modname", [pytest.param("kernels.sgd.reference", id="numpy")] + MODULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_step_values(modname, dtype):
    """Hand-computed steps (all values exact in binary): the rule of the docstring, for every flag."""
    mod = load(modname)
    p, g = np.array([1.0, -2.0], dtype), np.array([0.5, 0.25], dtype)
    # plain: p - lr g
    q = p.copy()
    mod.sgd_step(q, g, None, 0.5, 0.0, 0.0, 0.0, False, True)
    assert_close(q, [0.75, -2.125], 0, 0, name="plain")
    # weight decay 0.5: g + 0.5 p = [1, -0.75]; p - 0.5 (that) = [0.5, -1.625]
    q = p.copy()
    mod.sgd_step(q, g, None, 0.5, 0.0, 0.0, 0.5, False, True)
    assert_close(q, [0.5, -1.625], 0, 0, name="weight decay")
    # momentum 0.5, dampening 0.5: step 1 b = g, p - b; step 2 b = 0.5 b + 0.5 g = g again
    q, b = p.copy(), np.full_like(p, np.nan)
    mod.sgd_step(q, g, b, 1.0, 0.5, 0.5, 0.0, False, True)
    assert_close(b, g, 0, 0, name="buffer after the first step")
    mod.sgd_step(q, g, b, 1.0, 0.5, 0.5, 0.0, False, False)
    assert_close(b, g, 0, 0, name="damped buffer")
    assert_close(q, p - 2 * g, 0, 0, name="two momentum steps")
    # nesterov, momentum 0.5: b = g, d = g + 0.5 b = 1.5 g
    q, b = p.copy(), np.full_like(p, np.nan)
    mod.sgd_step(q, g, b, 1.0, 0.5, 0.0, 0.0, True, True)
    assert_close(q, p - 1.5 * g, 0, 0, name="nesterov")


@pytest.mark.parametrize("modname", [pytest.param("kernels.sgd.reference", id="numpy")] + MODULES)
@settings(max_examples=8, deadline=None)
@given(count=st.integers(1, sgd_cpu.GROUP + 3), dtype=st.sampled_from([np.float32, np.float64]), options=sgd_options(),
       seed=st.integers(0, 2**32 - 1))
def test_sgd_steps_is_sgd_step_of_each_parameter(modname, count, dtype, options, seed):
    """``sgd_steps`` (an optimizer's whole step in one call) against the reference's ``sgd_step`` of each
    parameter: two steps (the buffer's first, then one that reads it), every parameter and buffer compared
    whole. Up to GROUP + 3 parameters (the cpu kernel's groups and a padded last one), one of them
    PARALLEL_MIN or GROUP_MAX long (cpu: in a group or on its own), one with a strided gradient; the
    second step's lr given as a one-element array, as the optimizer gives it."""
    mod = load(modname)
    simulated = modname.endswith(".cuda") and config.ENABLE_CUDASIM
    if simulated:  # the cuda backend's loop over sgd_step: a few parameters show it (each launch is slow simulated)
        count = min(count, 3)
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(1, 9 if simulated else 50, count)]
    if not simulated:  # one parameter in the cpu backend's parallel kernel (a group's, or on its own)
        sizes[count // 2] = sgd_cpu.PARALLEL_MIN + 5 if count % 2 else sgd_cpu.GROUP_MAX + 5
    p0 = [rng.standard_normal(n).astype(dtype) for n in sizes]
    grads = [[rng.standard_normal(n).astype(dtype) for n in sizes] for _ in range(2)]
    grads[0][0] = rng.standard_normal(2 * sizes[0]).astype(dtype)[::2]  # a strided gradient (only read)
    rtol, atol = tolerance(modname, dtype)
    momentum = options["momentum"]
    want = [p.copy() for p in p0], [np.full_like(p, np.nan) for p in p0] if momentum else [None] * count
    xp = cc.xp if modname.endswith(".cuda") else np
    got = [xp.asarray(p).copy() for p in p0], [xp.full(p.shape, np.nan, dtype) for p in p0] if momentum else [None] * count
    for step, gs in enumerate(grads):
        for p, b, g in zip(*want, gs):
            REF.sgd_step(p, g, b, **options, first_step=step == 0)
        # the second step gets lr as the optimizer passes it: a one-element float64 array (minseg.optim.SGD)
        given = dict(options, lr=np.array([options["lr"]])) if step else options
        assert mod.sgd_steps(got[0], [xp.asarray(g) for g in gs], got[1], **given, first_step=step == 0) is None
        for k in range(count):
            assert_close(to_numpy(got[0][k]), want[0][k], rtol, atol, name=f"param {k} after step {step + 1}")
            if momentum:
                assert_close(to_numpy(got[1][k]), want[1][k], rtol, atol, name=f"buffer {k} after step {step + 1}")


def test_cpu_sgd_steps_makes_one_call_per_group(monkeypatch):
    """GROUP small parameters per compiled call; a parameter of another dtype than the first's, or a large
    one, goes on its own."""
    calls, alone = [], []
    group, step = sgd_cpu._sgd_group, sgd_cpu.sgd_step
    monkeypatch.setattr(sgd_cpu, "_sgd_group", lambda *a: calls.append(a[3]) or group(*a))
    monkeypatch.setattr(sgd_cpu, "sgd_step", lambda *a: alone.append(a[0].size) or step(*a))
    params = [np.ones(3, np.float32) for _ in range(sgd_cpu.GROUP + 1)] + [np.ones(2, np.float64)]
    params.append(np.ones(sgd_cpu.GROUP_MAX, np.float32))
    grads = [np.full_like(p, 2) for p in params]
    sgd_cpu.sgd_steps(params, grads, [None] * len(params), 0.5, 0.0, 0.0, 0.0, False, True)
    assert calls == [sgd_cpu.GROUP, 1] and alone == [2, sgd_cpu.GROUP_MAX]
    for p in params:
        np.testing.assert_array_equal(p, np.zeros_like(p))  # 1 - 0.5 * 2
