"""Softmax, log-softmax and the fused cross-entropy CUDA kernels against the NumPy reference.

Under the simulator each CUDA thread is a Python thread, and the cross-entropy's
block reductions (warp shuffles and ``syncthreads``) are slow there, so the
pixel counts stay below ~300: one simulated block (32 threads x 4 pixels) holds
128 pixels, so up to three blocks with a partial last one, i.e. the per-block
partial sums and the fixed-order sum over several blocks. Outputs are
NaN-poisoned (``cuda_common.empty``): an unwritten element fails the comparison.

Tolerances (``tests.helpers.tol``): float32 rtol 1e-4, atol 1e-5. The kernel
sums a pixel's C <= 40 exponentials in class order and the per-pixel losses in
a shuffle tree; the reference sums vectorised in other orders. Each of these
sums has at most a few hundred O(1)-relative terms, so the two float32 results
differ by a few ulp times sqrt(terms), far below 1e-4 relative; atol 1e-5
covers gradients that cancel to ~0. (Under the simulator the kernels even
compute some steps in float64 Python floats.) denom is a float64 sum of at most
300 weights in both: 1e-12 relative.
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
    """Logits (N, C, S) (C = 1 and C > 32 included), targets with ignored pixels, optional weights,
    a reduction and label smoothing."""
    dtype = draw(FLOATS)
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 7) | st.sampled_from([1, 40]))
    s = draw(st.integers(1, max(1, min(300, 1500 // c) // n)))
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


def _check_against_reference(args, gloss):
    """The fused forward (with and without the gradient) and the scaling backward vs the reference."""
    dtype = args[0].dtype
    loss_ref, d_ref, denom_ref, _ = R.cross_entropy_forward(*args, True)
    loss, dlogits, denom, n_invalid = K.cross_entropy_forward(*args, True)
    assert loss.dtype == dtype and loss.shape == loss_ref.shape  # (N, S) or 0-d
    # 'mean' with every pixel ignored is 0/0 = NaN in both (assert_close treats NaN == NaN)
    assert_close(loss, loss_ref, *tol(dtype), name="loss")
    assert dlogits.dtype == dtype and np.isfinite(to_numpy(dlogits)).all()
    assert_close(dlogits, d_ref, *tol(dtype), name="dlogits")
    assert_close(denom, denom_ref, 1e-12, 0, name="denom")
    assert int(n_invalid) == 0
    g = K.cross_entropy_backward(dlogits, gloss, args[4])
    g_ref = R.cross_entropy_backward(d_ref, gloss, args[4])
    assert g.dtype == dtype and np.isfinite(to_numpy(g)).all()
    assert_close(g, g_ref, *tol(dtype), name="glogits")
    ignored = args[1] == args[3]
    assert (np.moveaxis(to_numpy(g), 1, -1)[ignored] == 0).all(), "ignored pixels must get exactly 0"
    loss_only, none, _, _ = K.cross_entropy_forward(*args, False)
    assert none is None
    assert_close(loss_only, loss, 0, 0, name="loss without the gradient")


# The simulator runs 'mean' with every pixel ignored as NumPy scalars: 0/0 warns (on a GPU it is a quiet NaN).
@pytest.mark.filterwarnings("ignore:invalid value encountered in scalar divide:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@settings(max_examples=14)
@given(problem=xent_problems())
def test_cross_entropy_forward_and_backward_match_reference(problem):
    args, rng = problem
    gloss = rng.standard_normal(np.shape(R.cross_entropy_forward(*args, False)[0])).astype(args[0].dtype)
    _check_against_reference(args, gloss)


@pytest.mark.parametrize("n_classes", [1, 4, 33])
def test_cross_entropy_mean_reduces_over_three_blocks(n_classes):
    """2 B + 4 pixels for B pixels per full block (128 under the simulator: 32 threads x PIXELS 4; 260
    pixels): three blocks, the last partial (4 pixels); then the fixed-order sum of the blocks' partials.
    C = 1 (loss and gradient 0) and C = 33 > 32. (The gradient's scaling launches a thread per logit:
    C x pixels stays small.)"""
    pixels = 2 * K._xent_threads(1 << 30) * K.PIXELS + 4
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1, n_classes, pixels)).astype(np.float32)
    target = rng.integers(0, n_classes, (1, pixels))
    target[0, ::7] = -100
    weight = rng.uniform(0.5, 1.5, n_classes).astype(np.float32)
    assert K.cc.blocks(pixels, K._xent_threads(pixels) * K.PIXELS) == 3
    _check_against_reference((logits, target, weight, -100, "mean", 0.2), np.asarray(1.5, np.float32))


def test_cross_entropy_counts_targets_out_of_range_on_the_device():
    """Two bad targets (one per block): counted over the blocks, their pixels left out like ignored ones."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 3, 100)).astype(np.float32)
    target = rng.integers(0, 3, (2, 100))
    target[0, 5], target[1, 90] = 3, -7
    loss, dlogits, denom, n_invalid = K.cross_entropy_forward(logits, target, None, -100, "sum", 0.0, True)
    cleaned = np.where((target < 0) | (target >= 3), -100, target)
    loss_ref, d_ref, denom_ref, _ = R.cross_entropy_forward(logits, cleaned, None, -100, "sum", 0.0, True)
    assert int(n_invalid) == 2
    assert_close(loss, loss_ref, *tol(np.float32), name="loss")
    assert_close(dlogits, d_ref, *tol(np.float32), name="dlogits")
    assert float(denom) == float(denom_ref) == 198


def test_cross_entropy_is_deterministic():
    """No atomics: two runs give the same bits (the block partials are added in a fixed order)."""
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((2, 5, 150)) * 30).astype(np.float32)
    target = rng.integers(0, 5, (2, 150))
    first = to_numpy(K.cross_entropy_forward(logits, target, None, -100, "mean", 0.1, False)[0])
    again = to_numpy(K.cross_entropy_forward(logits, target, None, -100, "mean", 0.1, False)[0])
    np.testing.assert_array_equal(again, first)


def test_functional_cross_entropy_range_check_on_the_cuda_backend():
    """functional raises on the kernel's count of bad targets, naming one; ignore_index outside [0, C) is fine."""
    import minseg
    from minseg import backend
    from minseg.functional import cross_entropy

    logits = minseg.Tensor(np.zeros((2, 3, 4, 5), np.float32))
    target = np.zeros((2, 4, 5), np.int64)
    target[1, 2, 3] = 255
    with backend.using("cuda"):
        assert np.isclose(float(cross_entropy(logits, minseg.Tensor(target), ignore_index=255).item()), np.log(3))
        with pytest.raises(ValueError, match=r"target value 255 is out of range: expected class indices in \[0, 2\]"):
            cross_entropy(logits, minseg.Tensor(target))
