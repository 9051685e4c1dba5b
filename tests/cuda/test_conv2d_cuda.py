"""conv2d's CUDA kernels -- every forward version and each gradient -- against the NumPy reference.

Under the simulator (no GPU) each CUDA thread is a Python thread, so the shapes
are tiny: at most ~50 output pixels, which still spans several 16-wide tiles of
the v2 forward and several 128-thread blocks of the element-wise kernels, with
partial blocks at every edge (sizes are drawn, so they are rarely multiples of a
block). Outputs come from ``cuda_common.empty``, filled with NaN under the
simulator: an element a kernel forgets to write fails the whole-array comparison.

Tolerances (``tests.helpers.tol``): float32 rtol 1e-4, atol 1e-5. The kernels
and the reference add the same products in different orders (sequential loops
or a shared-memory tree here, einsum/BLAS blocking there); each of the at most
~50 terms of a sum, products of unit normals, contributes a rounding error of
~6e-8 relative to the partial sum, so the difference stays ~1e-6 and below
1e-5 absolute even when the sum cancels to near 0. float64: 1e-10 / 1e-12.

The register-tiled versions (forward v3/v4, grad_input v3, grad_weight v3) launch
256-thread blocks with their GPU tiles: the drawn problems pass small tiles
(``TEST_TILES``, 16-thread blocks, so most problems still span several tiles with
partial ones at every edge), a fixed small problem runs every GPU tile
configuration (``REAL_TILES``), and the others run the simulator's default tiles.
"""
import inspect

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from kernels.conv2d import cuda as K
from kernels.shapes import conv_output_size
from tests.helpers import assert_close, reference, tol

R = reference("conv2d")
FLOATS = st.sampled_from([np.float32, np.float64])


# (BM, BN, BK, TM, TN): square 2x2 register tiles; and 1x2 ones where only half the
# threads stage the BK x BM tile (BK*BM < threads), with BK = 2 < Cg possible.
TEST_TILES = [(8, 8, 4, 2, 2), (4, 8, 2, 1, 2)]


REAL_TILES = sorted(set(K.TILES_V3.values()) | set(K.TILES_V4.values()))


def _tiles_kwargs(fn, tiles):
    """``tiles=`` for the versions that take it (the register-tiled ones)."""
    return {"tiles": tiles} if "tiles" in inspect.signature(fn).parameters else {}


def _tiles(size):
    return -(-size // K.TILE)


def _out(size, pads, dilation, k, stride):
    return conv_output_size(size, sum(pads), dilation, k, stride)


@st.composite
def problems(draw, max_pixels=48, max_weights=None, max_og=3, max_cg=2, max_weight_tiles=None):
    """A random conv2d: arrays (x, w, b) and the hyper-parameters, sized for the simulator.

    ``max_pixels`` bounds N*Ho*Wo (threads of the forward), ``max_weights`` the
    weight count (blocks of grad_weight v1), ``max_weight_tiles`` the TILE x TILE
    tiles of grad_weight v2's per-group (Og x Cg*kh*kw) products over all groups
    (its blocks); ``max_og``/``max_cg`` bound the channels per group.
    """
    dtype = draw(FLOATS)
    groups, cg, og = draw(st.integers(1, 3)), draw(st.integers(1, max_cg)), draw(st.integers(1, max_og))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))  # asymmetric
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    ho, wo = _out(h, padding[0], dilation[0], kh, stride[0]), _out(w, padding[1], dilation[1], kw, stride[1])
    assume(ho >= 1 and wo >= 1 and n * ho * wo <= max_pixels)
    assume(max_weights is None or groups * og * cg * kh * kw <= max_weights)
    assume(max_weight_tiles is None or groups * _tiles(og) * _tiles(cg * kh * kw) <= max_weight_tiles)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, groups * cg, h, w)).astype(dtype)
    weight = rng.standard_normal((groups * og, cg, kh, kw)).astype(dtype)
    bias = rng.standard_normal(groups * og).astype(dtype) if draw(st.booleans()) else None
    return x, weight, bias, (stride, padding, dilation, groups), rng


def _grad_output(x, w, b, args, rng, trim):
    """A random dL/dy; ``trim`` drops bottom rows/right columns (conv_transpose2d's output_padding case)."""
    _, _, ho, wo = R.conv2d_forward(x, w, b, *args).shape
    return rng.standard_normal((x.shape[0], w.shape[0], max(ho - trim, 1), max(wo - trim, 1))).astype(x.dtype)


@pytest.mark.parametrize("version", sorted(K.FORWARD_VERSIONS))
@given(problem=problems(), contiguous=st.booleans(), tiles=st.sampled_from(TEST_TILES))
def test_forward_matches_reference(version, problem, contiguous, tiles):
    x, w, b, args, _ = problem
    if not contiguous:  # a strided view: the wrapper must copy it before the kernel indexes flat memory
        x = np.repeat(x, 2, axis=3)[..., ::2]
    forward = K.FORWARD_VERSIONS[version]
    y = forward(x, w, b, *args, **_tiles_kwargs(forward, tiles))
    assert y.dtype == x.dtype
    assert_close(y, R.conv2d_forward(x, w, b, *args), *tol(x.dtype), name=f"forward v{version}")


@pytest.mark.parametrize("version", sorted(K.FORWARD_VERSIONS))
def test_forward_several_tiles_in_every_direction(version):
    """17 channels, K = 2*3*3 = 18 taps and 20 pixels: two v2 tiles along each GEMM axis, the second partial."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    w = rng.standard_normal((17, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(17).astype(np.float32)
    args = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert_close(K.conv2d_forward(x, w, b, *args, version=version), R.conv2d_forward(x, w, b, *args), *tol(np.float32))


@pytest.mark.parametrize("tiles", REAL_TILES)
def test_tiled_forward_with_every_gpu_tile_configuration(tiles):
    """The forward's GPU tiles on a small problem: 17 output channels (a partial tile;
    two with 16-row tiles), 2 channels per tap (one partial K-slice), 2 x 4 x 5 pixels
    (one partial pixel tile); float32. (Groups: the small-tile tests.)"""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 4, 5)).astype(np.float32)
    w = rng.standard_normal((17, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(17).astype(np.float32)
    args = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    y = K.FORWARD_VERSIONS[3](x, w, b, *args, tiles=tiles)
    assert_close(y, R.conv2d_forward(x, w, b, *args), *tol(np.float32), name=f"forward {tiles}")


@pytest.mark.parametrize("tiles", TEST_TILES)
@pytest.mark.parametrize("groups", [1, 2])
def test_tiled_forward_several_channel_slices(tiles, groups):
    """Cg = 9 input channels per group: with BK = 4 (or 2) each tap takes three (five)
    K-slices, the last one partial, so the (tap, channel-slice) counters wrap mid-tap."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 9 * groups, 4, 3))
    w = rng.standard_normal((5 * groups, 9, 2, 3))
    b = rng.standard_normal(5 * groups)
    args = ((1, 2), ((1, 0), (1, 2)), (2, 1), groups)
    assert_close(K.FORWARD_VERSIONS[3](x, w, b, *args, tiles=tiles), R.conv2d_forward(x, w, b, *args), *tol(x.dtype))


def test_tiled_kernels_reject_tiles_they_cannot_stage():
    x, w = np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 1, 1))
    args = ((1, 1), ((0, 0), (0, 0)), (1, 1), 1)
    with pytest.raises(ValueError, match=r"tiles \(BM, BN, BK, TM, TN\) = \(64, 2, 4, 4, 2\)"):
        K.FORWARD_VERSIONS[3](x, w, None, *args, tiles=(64, 2, 4, 4, 2))  # 16 threads cannot stage 64 channel columns


def test_default_forward_is_a_listed_version():
    assert K.DEFAULT_FORWARD_VERSION in K.FORWARD_VERSIONS


@pytest.mark.parametrize("version", sorted(K.GRAD_INPUT_VERSIONS))
@given(problem=problems(), trim=st.integers(0, 1), tiles=st.sampled_from(TEST_TILES))
def test_grad_input_matches_reference(version, problem, trim, tiles):
    """v3 runs the forward on flipped weights when both strides are 1 (about a third
    of the drawn problems), the compile-time gather otherwise."""
    x, w, b, args, rng = problem
    gy = _grad_output(x, w, b, args, rng, trim)
    expected = R.conv2d_grad_input(gy, w, x.shape, *args)
    grad_input = K.GRAD_INPUT_VERSIONS[version]
    gx = grad_input(gy, w, x.shape, *args, **_tiles_kwargs(grad_input, tiles))
    assert_close(gx, expected, *tol(x.dtype), name=f"grad_input v{version}")


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((3, 0), (0, 4))])
def test_grad_input_v3_stride_one_with_real_tiles(padding):
    """The GPU tiles on a small stride-1 problem with 2 groups of 17 input channels
    (the flipped forward's output channels: one partial 32-row tile per group), and a
    padding that reaches past the kernel, so the flipped forward's padding is negative."""
    rng = np.random.default_rng(3)
    x_shape, w = (1, 34, 4, 5), rng.standard_normal((6, 17, 3, 3)).astype(np.float32)
    args = ((1, 1), padding, (1, 1), 2)
    ho, wo = _out(4, padding[0], 1, 3, 1), _out(5, padding[1], 1, 3, 1)
    gy = rng.standard_normal((1, 6, ho, wo)).astype(np.float32)
    gx = K.GRAD_INPUT_VERSIONS[3](gy, w, x_shape, *args, tiles=K._tiles_for(K.TILES_V3, 17))
    assert_close(gx, R.conv2d_grad_input(gy, w, x_shape, *args), *tol(np.float32))


def test_default_grad_input_is_a_listed_version():
    assert K.DEFAULT_GRAD_INPUT_VERSION in K.GRAD_INPUT_VERSIONS
    assert K.conv2d_grad_input.__defaults__ == (K.DEFAULT_GRAD_INPUT_VERSION,)


def _check_grad_weight(x, w, args, gy, version, **kwargs):
    gw = K.GRAD_WEIGHT_VERSIONS[version](x, gy, w.shape, *args, **kwargs)
    assert gw.dtype == x.dtype
    expected = R.conv2d_grad_weight(x, gy, w.shape, *args)
    assert_close(gw, expected, *tol(x.dtype), name=f"grad_weight v{version} {kwargs}")


def grouped_problem(groups, cg, og, kernel, seed):
    """A fixed conv2d with ``groups`` groups of ``cg`` input / ``og`` output channels, on a 1x(groups*cg)x4x5 input."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, groups * cg, 4, 5))
    w = rng.standard_normal((groups * og, cg, *kernel))
    return x, w, None, ((1, 1), ((0, 0), (1, 0)), (1, 1), groups), rng


# groups >= 2 with >= 2 channels per group: the only case where the input channel of a weight,
# g*Cg + c, differs from g + c or from g*Og + c (og != cg); random draws under max_weights rarely hit it
@example(problem=grouped_problem(2, 2, 1, (1, 2), seed=0), trim=0)
@example(problem=grouped_problem(3, 2, 2, (1, 1), seed=1), trim=1)
@settings(max_examples=12)
@given(problem=problems(max_pixels=40, max_weights=12), trim=st.integers(0, 1))
def test_grad_weight_v1_matches_reference(problem, trim):
    """v1 launches ~32 simulator threads per weight: at most 12 weights."""
    x, w, b, args, rng = problem
    _check_grad_weight(x, w, args, _grad_output(x, w, b, args, rng, trim), version=1)


@settings(max_examples=10)
@given(
    problem=problems(max_pixels=48, max_og=18, max_cg=3, max_weight_tiles=2),
    trim=st.integers(0, 1),
    splits=st.integers(1, 3),
)
def test_grad_weight_v2_matches_reference(problem, trim, splits):
    """Up to 18 channels per group and Cg*kh*kw up to 27 taps, so either GEMM axis of
    gW may span two tiles (the second partial), and N*Ho*Wo up to 48 = three M-slices,
    often partial; ``splits`` exercises split-K (the GPU's default) under the simulator,
    including splits with a partial or no M-slice."""
    x, w, b, args, rng = problem
    _check_grad_weight(x, w, args, _grad_output(x, w, b, args, rng, trim), version=2, splits=splits)


@settings(max_examples=10)
@given(
    problem=problems(max_pixels=48, max_og=10, max_cg=3),
    trim=st.integers(0, 1),
    splits=st.integers(1, 3),
    tiles=st.sampled_from(TEST_TILES),
)
def test_grad_weight_v3_and_fused_bias_match_reference(problem, trim, splits, tiles):
    """Small tiles, so Og up to 10 and K = Cg*kh*kw up to 27 span several tiles (the
    last partial) and each pixel row several BK-wide slices; ``splits`` exercises
    split-K and its fixed-order sum (splits with no slice write zeros). The fused
    grad_bias is checked in the same pass."""
    x, w, b, args, rng = problem
    gy = _grad_output(x, w, b, args, rng, trim)
    _check_grad_weight(x, w, args, gy, version=3, tiles=tiles, splits=splits)
    gw, gb = K.conv2d_grad_weight_bias(x, gy, w.shape, *args, tiles=tiles, splits=splits)
    assert_close(gw, R.conv2d_grad_weight(x, gy, w.shape, *args), *tol(x.dtype), name="fused gw")
    assert_close(gb, R.conv2d_grad_bias(gy), *tol(x.dtype), name="fused gb")


@pytest.mark.parametrize("version, tiles", [(2, None)] + [(3, t) for t in sorted(set(K.TILES_V3.values()))])
def test_grad_weight_several_tiles_in_every_direction(version, tiles):
    """17 channels x K = 2*3*3 = 18 taps of gW and M = 20 pixels: two v2 tiles along each
    GEMM axis, the second partial, in a group that does not start at channel 0; float32.
    v3 runs each of its GPU tile configurations (partial tiles in both directions).
    (v1 is left out: 612 weights would be ~20k simulator threads.)"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 5, 4)).astype(np.float32)
    w = rng.standard_normal((34, 2, 3, 3)).astype(np.float32)
    args = ((1, 1), ((1, 1), (1, 1)), (1, 1), 2)
    gy = rng.standard_normal((1, 34, 5, 4)).astype(np.float32)
    _check_grad_weight(x, w, args, gy, version=version, **({"tiles": tiles} if tiles else {}))


@pytest.mark.parametrize("version", sorted(K.GRAD_WEIGHT_VERSIONS))
def test_grad_weight_long_reduction(version):
    """N*Ho*Wo = 2*12*12 = 288 terms per weight: v1 threads add several terms before
    the tree (288 > 128 threads), v2 walks 18 M-slices, the last one partial; v3 (small
    tiles, BK = 4) walks three slices per pixel row across rows and images, in 2 splits."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 12, 12))
    gy = rng.standard_normal((2, 2, 12, 12))
    args = ((1, 1), ((1, 1), (0, 2)), (1, 1), 1)
    kwargs = {"tiles": TEST_TILES[0], "splits": 2} if version == 3 else {}
    _check_grad_weight(x, np.empty((2, 1, 3, 1)), args, gy, version=version, **kwargs)


def test_default_grad_weight_is_a_listed_version():
    assert K.DEFAULT_GRAD_WEIGHT_VERSION in K.GRAD_WEIGHT_VERSIONS
    assert K.conv2d_grad_weight.__defaults__ == (K.DEFAULT_GRAD_WEIGHT_VERSION,)


def test_grad_weight_split_policy(monkeypatch):
    """On a GPU, v2 splits M only when its tiles are too few blocks, and never below
    SPLIT_MIN_TILES slices per split; the simulator never splits."""
    monkeypatch.setattr(K.cc, "SIMULATOR", True)  # also on a GPU, where the module's value is False
    assert K._grad_weight_splits(1, 10**6) == 1
    monkeypatch.setattr(K.cc, "SIMULATOR", False)
    long_m = 10**6
    assert K._grad_weight_splits(K.SPLIT_TARGET_BLOCKS, long_m) == 1  # enough blocks already
    few = K._grad_weight_splits(4, long_m)
    assert few == -(-K.SPLIT_TARGET_BLOCKS // 4)  # fills the target
    m = 3 * K.TILE * K.SPLIT_MIN_TILES  # only enough M for three splits of SPLIT_MIN_TILES slices
    assert K._grad_weight_splits(1, m) == 3


@settings(max_examples=10)
@given(
    dtype=FLOATS,
    shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 2**32 - 1),
)
def test_grad_bias_matches_reference(dtype, shape, seed):
    gy = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    assert_close(K.conv2d_grad_bias(gy), R.conv2d_grad_bias(gy), *tol(dtype), name="grad_bias")


def test_rejects_non_float_and_mixed_dtypes():
    x, w = np.zeros((1, 1, 3, 3), np.int64), np.zeros((1, 1, 1, 1), np.int64)
    args = ((1, 1), ((0, 0), (0, 0)), (1, 1), 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        K.conv2d_forward(x, w, None, *args)
    with pytest.raises(TypeError, match="one dtype"):
        K.conv2d_forward(x.astype(np.float32), w.astype(np.float64), None, *args)
