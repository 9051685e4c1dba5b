"""Softmax, log-softmax and the fused cross-entropy CUDA kernels against the NumPy reference.

Under the simulator each CUDA thread is a Python thread, and the cross-entropy's
block reductions (``syncthreads``) are slow there, so the pixel counts stay
below ~300: enough for one to three 128-thread blocks with a partial last one,
i.e. for the per-block partial sums and the final reduction over several
blocks. Outputs are NaN-poisoned (``cuda_common.empty``): an unwritten element
fails the comparison.

Tolerances (``tests.helpers.tol``): float32 rtol 1e-4, atol 1e-5. The kernels
sum the C <= 7 exponentials per row online (rescaled when the maximum moves)
and the per-pixel losses in a shared-memory tree; the reference sums vectorised
in other orders. Each of these sums has at most a few hundred O(1)-relative
terms, so the two float32 results differ by a few ulp times sqrt(terms), far
below 1e-4 relative; atol 1e-5 covers gradients that cancel to ~0. (Under the
simulator the kernels even compute some steps in float64 Python floats.)
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.softmax_cross_entropy import cuda as K
from minseg.backend import to_numpy
from tests.helpers import assert_close, reference, tol

R = reference("softmax_cross_entropy")
FLOATS = st.sampled_from([np.float32, np.float64])


@settings(max_examples=12)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    dim_seed=st.integers(0, 3),
    dtype=FLOATS,
    scale=st.sampled_from([1.0, 30.0, 1000.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_softmax_and_log_softmax_match_reference(shape, dim_seed, dtype, scale, seed):
    """Any dim of a 1- to 4-D tensor; logits up to +-1000 must stay finite."""
    rng = np.random.default_rng(seed)
    dim = dim_seed % len(shape)
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    for name in ("softmax", "log_softmax"):
        y_ref = getattr(R, f"{name}_forward")(x, dim)
        y = getattr(K, f"{name}_forward")(x, dim)
        assert y.dtype == x.dtype and np.isfinite(to_numpy(y)).all()
        assert_close(y, y_ref, *tol(dtype), name=f"{name} forward")
        gx = getattr(K, f"{name}_backward")(y_ref, gy, dim)
        assert_close(gx, getattr(R, f"{name}_backward")(y_ref, gy, dim), *tol(dtype), name=f"{name} backward")


def test_softmax_rows_span_several_blocks():
    """outer * inner = 2 * 100 = 200 rows over two 128-thread blocks (softmax over dim 1 of NCHW)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)
    assert_close(K.softmax_forward(x, 1), R.softmax_forward(x, 1), *tol(np.float32))


@st.composite
def xent_problems(draw):
    """Logits (N, C, S), targets with ignored pixels, optional weights, a reduction and label smoothing."""
    dtype = draw(FLOATS)
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    s = draw(st.integers(1, 300 // n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = (rng.standard_normal((n, c, s)) * draw(st.sampled_from([1.0, 5.0, 1000.0]))).astype(dtype)
    ignore_index = draw(st.sampled_from([-100, 255, 0]))  # 0: a valid class can be the ignored one
    target = rng.integers(0, c, (n, s))
    ignored = rng.random((n, s)) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    target[ignored] = ignore_index
    weight = rng.uniform(0.1, 2.0, c).astype(dtype) if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    label_smoothing = draw(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0.0, 1.0))
    return (logits, target, weight, ignore_index, reduction, label_smoothing), rng


# The simulator runs 'mean' with every pixel ignored as NumPy scalars: 0/0 warns (on a GPU it is a quiet NaN).
@pytest.mark.filterwarnings("ignore:invalid value encountered in scalar divide:RuntimeWarning")
@settings(max_examples=14)
@given(problem=xent_problems())
def test_cross_entropy_forward_and_backward_match_reference(problem):
    args, rng = problem
    logits, dtype = args[0], args[0].dtype
    loss_ref, lse_ref = R.cross_entropy_forward(*args)
    loss, lse = K.cross_entropy_forward(*args)
    assert loss.dtype == dtype and loss.shape == loss_ref.shape  # (N, S) or 0-d
    # 'mean' with every pixel ignored is 0/0 = NaN in both (assert_close treats NaN == NaN)
    assert_close(loss, loss_ref, *tol(dtype), name="loss")
    assert_close(lse, lse_ref, *tol(dtype), name="lse")

    gloss = rng.standard_normal(loss_ref.shape).astype(dtype)
    g = K.cross_entropy_backward(*args, lse_ref, gloss)
    g_ref = R.cross_entropy_backward(*args, lse_ref, gloss)
    assert g.dtype == dtype and np.isfinite(to_numpy(g)).all()
    assert_close(g, g_ref, *tol(dtype), name="glogits")
    ignored = args[1] == args[3]
    assert (np.moveaxis(to_numpy(g), 1, -1)[ignored] == 0).all(), "ignored pixels must get exactly 0"


def test_cross_entropy_mean_reduces_over_three_blocks():
    """300 pixels: partial sums of three blocks (the last partial), then the one-block final sum."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1, 4, 300)).astype(np.float32)
    target = rng.integers(0, 4, (1, 300))
    target[0, ::7] = -100
    weight = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    args = (logits, target, weight, -100, "mean", 0.2)
    loss, lse = K.cross_entropy_forward(*args)
    loss_ref, lse_ref = R.cross_entropy_forward(*args)
    assert_close(loss, loss_ref, *tol(np.float32))
    g = K.cross_entropy_backward(*args, lse_ref, np.asarray(1.5, np.float32))
    assert_close(g, R.cross_entropy_backward(*args, lse_ref, np.asarray(1.5, np.float32)), *tol(np.float32))
