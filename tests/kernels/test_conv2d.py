"""conv2d kernels: every backend module vs the reference, for all four functions, plus the
reference's own index rules (unread pixels get 0, Ho/Wo taken from gy) on hand-made cases.

Shapes stay small enough for the CUDA simulator (every CUDA thread is a Python thread):
N <= 2, C <= 4, H, W <= 9 and at most 400 outputs, 128 weights; the CUDA module gets fewer,
smaller problems still.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernels.shapes import conv_output_size
from minseg.backend import to_numpy
from tests.helpers import assert_close, kernel_modules, load, reference, tol

ref = reference("conv2d")


def conv_out(size, pads, dilation, k, stride):
    """torch's output length; pads = (before, after)."""
    return conv_output_size(size, sum(pads), dilation, k, stride)


@st.composite
def conv_cases(draw, max_batch=2, max_channels=4, max_side=9, max_kernel=4, max_elements=None, max_weights=128, max_outputs=400, symmetric=False):
    """A valid conv2d problem: shapes and (stride, padding, dilation, groups) as the kernels take them.

    groups divides both channel counts; sides from 1 (odd and even), 1x1 kernels, asymmetric
    padding (unless ``symmetric``), and with probability ~1/4 per axis a kernel that spans the
    whole padded image (as large as dilation allows: Ho = 1). ``max_weights`` and
    ``max_outputs`` bound the sizes of w and y (the CUDA simulator runs a thread block per
    weight in grad_weight and a thread per output in the forward), ``max_elements`` the sizes
    of x and w (gradcheck perturbs each element).
    """
    groups = draw(st.integers(1, max_channels))
    c_in = groups * draw(st.integers(1, max(1, max_channels // groups)))
    c_out = groups * draw(st.integers(1, max(1, max_channels // groups)))
    n = draw(st.integers(1, max_batch))
    hw = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pads = []
    for _ in range(2):
        before = draw(st.integers(0, 2))
        pads.append((before, before if symmetric else draw(st.integers(0, 2))))
    kernel = []
    for a in range(2):
        if draw(st.integers(0, 3)) == 0:  # the largest kernel that fits the padded image
            kernel.append((hw[a] + sum(pads[a]) - 1) // dilation[a] + 1)
        else:
            kernel.append(draw(st.integers(1, max_kernel)))
    out = tuple(conv_out(hw[a], pads[a], dilation[a], kernel[a], stride[a]) for a in range(2))
    assume(min(out) >= 1)
    w_shape = (c_out, c_in // groups, *kernel)
    assume(int(np.prod(w_shape)) <= max_weights and n * c_out * out[0] * out[1] <= max_outputs)
    if max_elements is not None:
        assume(n * c_in * hw[0] * hw[1] <= max_elements and int(np.prod(w_shape)) <= max_elements)
    return dict(
        x_shape=(n, c_in, *hw),
        w_shape=w_shape,
        y_shape=(n, c_out, *out),
        args=(stride, tuple(pads), dilation, groups),
    )


def conv_tol(dtype, case):
    """tol(dtype) with atol scaled by sqrt(T), T the longest sum (the forward adds Cg*kh*kw
    products, grad_weight N*Ho*Wo, grad_input at most C_out*kh*kw). A sum of T products of unit
    normals has magnitude ~sqrt(T), and its round-off is relative to that magnitude, not to the
    element's own value: an element where the sum cancels to ~0 keeps the absolute error of
    the big partial sums. tol's atol is for unit-sized results, so it scales with sqrt(T)."""
    rtol, atol = tol(dtype)
    _, cg, kh, kw = case["w_shape"]
    n, c_out, ho, wo = case["y_shape"]
    terms = max(cg * kh * kw, n * ho * wo, c_out * kh * kw)
    return rtol, atol * np.sqrt(terms)


def arrays(case, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case["x_shape"]).astype(dtype)
    w = rng.standard_normal(case["w_shape"]).astype(dtype)
    b = rng.standard_normal(case["w_shape"][0]).astype(dtype)
    gy = rng.standard_normal(case["y_shape"]).astype(dtype)
    return x, w, b, gy


def check_against_reference(mod, dtype, case, with_bias, seed):
    """All four functions of ``mod`` vs the reference: whole arrays, dtypes, fresh outputs."""
    x, w, b, gy = arrays(case, dtype, seed)
    b = b if with_bias else None
    args = case["args"]
    rtol, atol = conv_tol(dtype, case)

    expected = {
        "y": ref.conv2d_forward(x, w, b, *args),
        "gx": ref.conv2d_grad_input(gy, w, x.shape, *args),
        "gw": ref.conv2d_grad_weight(x, gy, w.shape, *args),
        "gb": ref.conv2d_grad_bias(gy),
    }
    actual = {
        "y": mod.conv2d_forward(x, w, b, *args),
        "gx": mod.conv2d_grad_input(gy, w, x.shape, *args),
        "gw": mod.conv2d_grad_weight(x, gy, w.shape, *args),
        "gb": mod.conv2d_grad_bias(gy),
    }
    assert expected["y"].shape == case["y_shape"]
    for name, value in actual.items():
        assert np.dtype(value.dtype) == dtype, f"{name} has dtype {value.dtype}, expected {np.dtype(dtype)}"
        assert_close(value, expected[name], rtol, atol, name=name)

    # outputs are fresh arrays, not workspaces that a later call overwrites
    kept = {name: to_numpy(value).copy() for name, value in actual.items()}
    mod.conv2d_forward(-x, -w, b, *args)
    mod.conv2d_grad_input(-gy, -w, x.shape, *args)
    mod.conv2d_grad_weight(-x, -gy, w.shape, *args)
    mod.conv2d_grad_bias(-gy)
    for name, value in actual.items():
        np.testing.assert_array_equal(to_numpy(value), kept[name], err_msg=f"{name} was overwritten")


CUDA = "kernels.conv2d.cuda"
CPU = "kernels.conv2d.cpu"
VERSION_TABLES = {"conv2d_forward": "FORWARD_VERSIONS", "conv2d_grad_input": "GRAD_INPUT_VERSIONS",
                  "conv2d_grad_weight": "GRAD_WEIGHT_VERSIONS"}


class AtVersion:
    """``mod``'s four conv2d functions called with ``version=k`` (those whose table lists k; the
    others at their default), so the property tests below check every numbered CPU version."""

    def __init__(self, mod, version):
        for fn_name, table in VERSION_TABLES.items():
            fn = getattr(mod, fn_name)
            setattr(self, fn_name, functools.partial(fn, version=version) if version in getattr(mod, table) else fn)
        self.conv2d_grad_bias = mod.conv2d_grad_bias


def cpu_versions():
    """Every version number that one of cpu.py's tables lists (none if cpu.py is absent)."""
    if not any(p.values[0] == CPU for p in kernel_modules("conv2d")):
        return []
    mod = load(CPU)
    return sorted(set().union(*(getattr(mod, table) for table in VERSION_TABLES.values())))


def host_modules():
    """pytest params (module, version): cpu.py at each numbered version (its defaults are listed
    versions, see test_cpu_versions_are_listed_and_checked), any other host module at its defaults."""
    params = [pytest.param(p.values[0], None, id=p.id) for p in kernel_modules("conv2d") if p.values[0] not in (CUDA, CPU)]
    return params + [pytest.param(CPU, v, id=f"cpu-v{v}") for v in cpu_versions()]


def load_at(modname, version):
    mod = load(modname)
    return mod if version is None else AtVersion(mod, version)


CUDA_MODULES = [p for p in kernel_modules("conv2d") if p.values[0] == CUDA]


@pytest.mark.parametrize("modname, version", host_modules())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=15)
@given(case=conv_cases(), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_kernels_match_reference(modname, version, dtype, case, with_bias, seed):
    check_against_reference(load_at(modname, version), dtype, case, with_bias, seed)


@pytest.mark.skipif(not cpu_versions(), reason="kernels/conv2d/cpu.py does not import here")
def test_cpu_versions_are_listed_and_checked():
    """Each function's default is one of its listed versions, and an unlisted version is a
    ValueError that names the function and the choices (not a KeyError from the table)."""
    mod = load(CPU)
    x, gy, w = np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)), np.ones((1, 1, 1, 1))
    args = ((1, 1), ((0, 0), (0, 0)), (1, 1), 1)
    calls = {
        "conv2d_forward": lambda version: mod.conv2d_forward(x, w, None, *args, version=version),
        "conv2d_grad_input": lambda version: mod.conv2d_grad_input(gy, w, x.shape, *args, version=version),
        "conv2d_grad_weight": lambda version: mod.conv2d_grad_weight(x, gy, w.shape, *args, version=version),
    }
    for fn_name, table in VERSION_TABLES.items():
        versions = getattr(mod, table)
        assert getattr(mod, "DEFAULT_" + table.replace("VERSIONS", "VERSION")) in versions
        with pytest.raises(ValueError, match=rf"{fn_name}: version must be one of \{sorted(versions)}, got 99"):
            calls[fn_name](99)


ALL_MODULES = [pytest.param("kernels.conv2d.reference", None, id="reference")] + host_modules() + [
    pytest.param(p.values[0], None, id=p.id) for p in CUDA_MODULES]


@pytest.mark.parametrize("modname, version", ALL_MODULES)
def test_grad_input_is_zero_where_no_output_reads(modname, version):
    """Kernel 2, stride 3 on 5 pixels: Ho = 2 windows read rows/cols {0, 1} and {3, 4}; 2 is skipped.
    A 1x1 kernel at stride 2 skips rows/cols 1 and 3."""
    mod = load_at(modname, version)
    x_shape = (1, 1, 5, 5)
    gy = np.ones((1, 1, 2, 2))
    gx = to_numpy(mod.conv2d_grad_input(gy, np.ones((1, 1, 2, 2)), x_shape, (3, 3), ((0, 0), (0, 0)), (1, 1), 1))
    read = np.array([1.0, 1.0, 0.0, 1.0, 1.0])
    assert_close(gx[0, 0], np.outer(read, read), rtol=0, atol=0, name="gx (k=2, s=3)")
    gx = to_numpy(mod.conv2d_grad_input(np.ones((1, 1, 3, 3)), np.ones((1, 1, 1, 1)), x_shape, (2, 2), ((0, 0), (0, 0)), (1, 1), 1))
    read = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    assert_close(gx[0, 0], np.outer(read, read), rtol=0, atol=0, name="gx (k=1, s=2)")


@pytest.mark.parametrize("modname, version", ALL_MODULES)
@settings(max_examples=8)
@given(case=conv_cases(max_channels=2, max_side=5, max_weights=16, max_outputs=64), seed=st.integers(0, 2**16))
def test_gradients_take_ho_wo_from_gy(modname, version, case, seed):
    """A gy with fewer rows/cols than the forward's Ho/Wo (conv_transpose2d with output_padding >=
    stride) acts as the full-size gy with zeros in the rows/cols it lacks."""
    mod = load_at(modname, version)
    _, _, ho, wo = case["y_shape"]
    assume(ho > 1 or wo > 1)
    x, w, _, gy_full = arrays(case, np.float64, seed)
    gy = np.ascontiguousarray(gy_full[:, :, : max(ho - 1, 1), : max(wo - 1, 1)])
    gy_full[...] = 0
    gy_full[:, :, : gy.shape[2], : gy.shape[3]] = gy
    args = case["args"]
    assert_close(mod.conv2d_grad_input(gy, w, x.shape, *args), ref.conv2d_grad_input(gy_full, w, x.shape, *args), 1e-10, 1e-12, name="gx")
    assert_close(mod.conv2d_grad_weight(x, gy, w.shape, *args), ref.conv2d_grad_weight(x, gy_full, w.shape, *args), 1e-10, 1e-12, name="gw")


# stride (2, 1), im2col: a band's column matrix has C_in*kh*kw = 24 rows of 8-byte values per output
# row of Wo = 6 columns (1152 bytes): 1 byte forces bands of one row, 4700 bytes bands of 4 rows out of
# Ho = 7 (4 + 3); 3 images x 7 bands = 21 (image, band) items split over 2 threads as 11 + 10, mid-image.
# stride 1, taps: a band row holds C_in + C_out = 10 rows of Wq = Wo + (kw-1)*dw = 8 values (640 bytes):
# bands of 1 row, or 4700 bytes (7 rows at most) two bands of 7 out of Ho = 13 (7 + a ragged 6)
@pytest.mark.parametrize("band_bytes", [1, 4700])
@pytest.mark.parametrize("threads", ["all", "one", "no-openblas"])
@pytest.mark.parametrize("stride", [(2, 1), (1, 1)])
def test_cpu_kernels_agree_across_bands_and_threads(monkeypatch, band_bytes, threads, stride):
    """cpu.py splits (image, band of output rows) work items over Numba threads, each with its own
    band buffers in a workspace kept between calls, with taps at stride 1 and im2col otherwise.
    Bands of one row and of several with a ragged last one, an image split between two threads,
    one thread, and the fallback without OpenBLAS (items on one thread) must give the reference's
    result, even when the workspace holds garbage (NaN) from before; so must both grad_input
    paths (stride 1: the flipped-kernel forward, and col2im, which serves every stride).
    OpenBLAS's thread count is restored after each call."""
    import numba

    cpu = pytest.importorskip("kernels.conv2d.cpu")
    monkeypatch.setattr(cpu, "_BAND_BYTES", band_bytes)
    monkeypatch.setattr(cpu, "_TAPS_BAND_BYTES", band_bytes)
    assert cpu._band_rows(24, 7, 6, 8) == (1 if band_bytes == 1 else 4)
    assert cpu._taps_band(4, 6, (13, 6), (3, 2), (1, 2), 8)[0] == (1 if band_bytes == 1 else 7)
    if threads == "no-openblas":
        monkeypatch.setattr(cpu, "_OPENBLAS", None)
    case = dict(x_shape=(3, 4, 12, 7), w_shape=(6, 2, 3, 2), args=(stride, ((1, 2), (0, 1)), (1, 2), 2))
    case["y_shape"] = (3, 6, conv_out(12, (1, 2), 1, 3, stride[0]), conv_out(7, (0, 1), 2, 2, 1))
    assert case["y_shape"][2] == (7 if stride == (2, 1) else 13)
    x, w, b, gy = arrays(case, np.float64, 0)
    args = case["args"]
    openblas_threads = cpu._OPENBLAS[0]() if cpu._OPENBLAS is not None else None
    numba_threads = numba.get_num_threads()
    try:
        if threads == "one":
            numba.set_num_threads(1)
        for poison in (False, True):
            if poison:  # im2col must write every column the GEMM reads
                for buf in cpu._WORKSPACE.values():
                    buf[...] = np.nan
            assert_close(cpu.conv2d_forward(x, w, b, *args), ref.conv2d_forward(x, w, b, *args), 1e-10, 1e-12, name="y")
            gx = ref.conv2d_grad_input(gy, w, x.shape, *args)
            assert_close(cpu.conv2d_grad_input(gy, w, x.shape, *args), gx, 1e-10, 1e-12, name="gx")
            assert_close(cpu._grad_input_col2im(gy, w, x.shape, *args), gx, 1e-10, 1e-12, name="gx (col2im)")
            assert_close(cpu.conv2d_grad_weight(x, gy, w.shape, *args), ref.conv2d_grad_weight(x, gy, w.shape, *args), 1e-10, 1e-12, name="gw")
    finally:
        numba.set_num_threads(numba_threads)
    if openblas_threads is not None:
        assert cpu._OPENBLAS[0]() == openblas_threads


@contextlib.contextmanager
def threads_on_poisoned_workspace(cpu, threads):
    """Numba at one thread (``threads == "one"``) or all of them for the block, with every workspace
    buffer of cpu.py filled with NaN first: a kernel that reads scratch it did not write fails."""
    import numba

    before = numba.get_num_threads()
    try:
        if threads == "one":
            numba.set_num_threads(1)
        for buf in cpu._WORKSPACE.values():
            buf[...] = np.nan
        yield
    finally:
        numba.set_num_threads(before)


# v4's micro-tiles: the forward's are MR = 6 channels x NR = 16 (or 32) wide pixels, grad_weight's
# MW = 4 channels x KT = 3 weights. Og = 13 is two full forward channel blocks and a partial one
# (three and a partial for grad_weight); Cg*kh*kw = 5*2*2 = 20 weights are six blocks of 3 and a
# partial one. With Wq = Wo + (kw-1)*dw = 13 + 2 = 15 columns per band row, strips of NR wide pixels
# straddle rows, the last strip of a band is partial, and grad_weight's dot products over 15*rows
# pixels end with a partial vector. A band row takes (10 + 26) * 15 * 8 = 4320 bytes: 600 bytes give
# bands of 1 row, 21600 bytes (5 rows at most) two bands out of Ho = 9 (5 and a ragged 4).
# v5's blocks are MR5 = 8 channels x up to NV5 = 3 vectors (8 float64 each), and MW5 = 4 channels x KT5 =
# 5 weights: Og = 13 leaves partial channel blocks (20 weights are four whole blocks of 5: the property tests
# above cover partial ones), and a band's
# 15*rows wide pixels end with a partial vector (padded with zeros) and strips of 1 or 2 vectors.
# v5 reads and writes y and gy in place when Wo is a multiple of the lanes (8 float64) -- the second
# width, 16 -- and Og >= MR5; its last channel block then overlaps the one before (Og = 13 or 12);
# grad_weight reads gy in place only when Og is a multiple of MW5 (12, not 13), in bands of
# _DOTS_VECTORS vectors: 4 gives bands of 2 rows (ragged), 64 whole images in runs of two of the 3
# images on two threads (a ragged last run of one), all three on one.
@pytest.mark.parametrize("band_bytes", [600, 21600])
@pytest.mark.parametrize("threads", ["all", "one"])
@pytest.mark.parametrize("version, width, c_out", [(4, 13, 26), (5, 13, 26), (5, 16, 26), (5, 16, 24)])
def test_cpu_micro_tiles_cover_every_block(monkeypatch, band_bytes, threads, version, width, c_out):
    """All three functions of v4 and v5 vs the reference where the micro-tiles' edges matter: partial
    channel and weight blocks, strips across band rows, ragged bands, two groups, dilation, asymmetric
    and cropping (grad_input's negative) padding, a workspace full of NaN, and v5's in-place blocks."""

    cpu = pytest.importorskip("kernels.conv2d.cpu")
    monkeypatch.setattr(cpu, "_TAPS_BAND_BYTES", band_bytes)
    monkeypatch.setattr(cpu, "_DOTS_VECTORS", 4 if band_bytes == 600 else 64)
    case = dict(x_shape=(3, 10, 9, width), w_shape=(c_out, 5, 2, 2), args=((1, 1), ((1, 0), (2, 0)), (1, 2), 2))
    case["y_shape"] = (3, c_out, conv_out(9, (1, 0), 1, 2, 1), conv_out(width, (2, 0), 2, 2, 1))
    assert case["y_shape"][2:] == (9, width)
    if (width, c_out) == (13, 26):
        assert cpu._taps_band(10, 26, (9, 13), (2, 2), (1, 2), 8)[0] == (1 if band_bytes == 600 else 5)
    if (width, c_out) == (16, 24):
        assert cpu._dots_band(3, 1, 9, 2) == ((2, 1) if band_bytes == 600 else (9, 3))
        assert cpu._dots_band(3, 2, 9, 2) == ((2, 1) if band_bytes == 600 else (9, 2))
    x, w, b, gy = arrays(case, np.float64, 1)
    args = case["args"]
    with threads_on_poisoned_workspace(cpu, threads):
        assert_close(cpu.conv2d_forward(x, w, b, *args, version=version), ref.conv2d_forward(x, w, b, *args), 1e-10, 1e-12, name="y")
        assert_close(cpu.conv2d_grad_input(gy, w, x.shape, *args, version=version), ref.conv2d_grad_input(gy, w, x.shape, *args),
                     1e-10, 1e-12, name="gx")
        assert_close(cpu.conv2d_grad_weight(x, gy, w.shape, *args, version=version), ref.conv2d_grad_weight(x, gy, w.shape, *args),
                     1e-10, 1e-12, name="gw")


# v5's narrow and 1x1 paths: Og < MR5 writes y in place with blocks of 4 channels (Og = 5: two
# overlapping blocks; Og = 4: one), Og < 4 takes the wide layout; a 1x1 kernel without padding reads x
# itself as its band (``direct``, forward and grad_weight), with padding it pads as any other kernel.
@pytest.mark.parametrize("c_out, groups, kernel, pad", [(4, 1, 1, 0), (10, 2, 1, 0), (8, 1, 1, 0), (6, 2, 1, 0), (5, 1, 1, 1),
                                                        (5, 1, 3, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_v5_narrow_outputs_and_one_by_one(c_out, groups, kernel, pad, dtype):
    cpu = pytest.importorskip("kernels.conv2d.cpu")
    width = 16 - 2 * pad + kernel - 1  # Wo = 16: whole vectors of either dtype
    case = dict(x_shape=(3, 6, 5, width), w_shape=(c_out, 6 // groups, kernel, kernel), args=((1, 1), ((pad, pad), (pad, pad)), (1, 1), groups))
    case["y_shape"] = (3, c_out, 5 - kernel + 1 + 2 * pad, 16)
    x, w, b, gy = arrays(case, dtype, 2)
    args = case["args"]
    for buf in cpu._WORKSPACE.values():
        buf[...] = np.nan
    rtol, atol = conv_tol(dtype, case)
    assert_close(cpu.conv2d_forward(x, w, b, *args, version=5), ref.conv2d_forward(x, w, b, *args), rtol, atol, name="y")
    assert_close(cpu.conv2d_grad_input(gy, w, x.shape, *args, version=5), ref.conv2d_grad_input(gy, w, x.shape, *args),
                 rtol, atol, name="gx")
    assert_close(cpu.conv2d_grad_weight(x, gy, w.shape, *args, version=5), ref.conv2d_grad_weight(x, gy, w.shape, *args),
                 rtol, atol, name="gw")


def _micro_tile_call(cpu):
    """(kernel, args, expected tile, multiply-adds per reduction step) for ``_micro_tile`` on ones:
    2*3*3 products per element."""
    tile = np.empty((cpu.MR, cpu.NR), np.float32)
    args = (np.ones(4000, np.float32), 0, 300, 20, 1, 2, 3, 3, np.ones((18, cpu.MR), np.float32), 0, tile)
    return cpu._micro_tile, args, np.full(tile.shape, 18.0), cpu.MR * cpu.NR


def _micro_dots_call(cpu):
    """The same for ``_micro_dots``: dot products of 301 ones (a partial last vector)."""
    tile = np.empty((cpu.MW, cpu.KT), np.float32)
    ones = np.ones(4000, np.float32)
    args = (ones, 0, 400, 800, 1200, ones, 7, 8, 2000, 301, tile)
    return cpu._micro_dots, args, np.full(tile.shape, 301.0), cpu.MW * cpu.KT * cpu.LANES


def _vector_tile_call(cpu):
    """The same for v5's ``tile_product`` (MR5 channels x NV5 vectors, called with addresses): rows k of
    B start at 0, 7, 14, ..., the vectors at 0, 40, 80 in B and 0, 16, 32 in y; weights of ones and a
    bias of ones: 1 + 18 products per element."""
    from kernels.conv2d.microkernels import tile_product

    mr, nv = cpu.MR5, cpu.NV5  # compile-time constants of the kernel below

    def kernel(x, offs, vectors, w, bias, y):
        tile_product(x, x.ctypes.data, vectors[0].ctypes.data, offs.ctypes.data, w.ctypes.data, w.shape[1], offs.size,
                     y.ctypes.data, vectors[1].ctypes.data, y.shape[1], bias.ctypes.data, mr, nv)

    y = np.empty((cpu.MR5, cpu.NV5 * 16), np.float32)
    vectors = np.stack([np.arange(cpu.NV5) * 40, np.arange(cpu.NV5) * 16])
    args = (np.ones(4000, np.float32), np.arange(18) * 7, vectors, np.ones((18, cpu.MR5), np.float32),
            np.ones(cpu.MR5, np.float32), y)
    return kernel, args, np.full(y.shape, 19.0), cpu.MR5 * cpu.NV5 * 16


def _vector_dots_call(cpu):
    """The same for v5's ``tile_dots``: MW5 x KT5 dot products of 20 vectors of ones, added to ones."""
    from kernels.conv2d.microkernels import tile_dots

    mw, kt = cpu.MW5, cpu.KT5

    def kernel(gy, x, offs, vectors, out):
        tile_dots(x, gy.ctypes.data, vectors[0].ctypes.data, gy.shape[1], x.ctypes.data, vectors[1].ctypes.data,
                  offs.ctypes.data, vectors.shape[1], out.ctypes.data, out.shape[1], mw, kt)

    out = np.ones((cpu.MW5, cpu.KT5), np.float32)
    vectors = np.stack([np.arange(20) * 16, np.arange(20) * 17])
    args = (np.ones((cpu.MW5, 400), np.float32), np.ones(4000, np.float32), np.arange(cpu.KT5) * 5, vectors, out)
    return kernel, args, np.full(out.shape, 321.0), cpu.MW5 * cpu.KT5 * 16


@pytest.mark.parametrize("call", [_micro_tile_call, _micro_dots_call, _vector_tile_call, _vector_dots_call],
                         ids=["v4-forward", "v4-grad_weight", "v5-forward", "v5-grad_weight"])
def test_cpu_micro_kernels_keep_their_accumulators_in_registers(call):
    """v4's and v5's point: the reduction loop of each micro-kernel does its multiply-adds as vector FMAs
    on registers -- (multiply-adds per step)/lanes FMA instructions, and no vector register saved to
    or loaded from the stack in that loop; v5's are 512-bit (zmm) wherever the CPU has AVX-512. A change that sends the accumulators to memory (a heap
    array, an index LLVM cannot resolve, too many accumulators) fails here even though the results
    stay right. Compiled afresh: cached code cannot be inspected."""
    import re

    import numba

    cpu = pytest.importorskip("kernels.conv2d.cpu")
    if "fma" not in open("/proc/cpuinfo").read():
        pytest.skip("no FMA instructions on this CPU")
    kernel, args, expected, per_step = call(cpu)
    fresh = numba.njit(fastmath={"contract"})(getattr(kernel, "py_func", kernel))
    fresh(*args)
    assert_close(args[-1], expected, 0, 0, name="tile")
    lines = next(iter(fresh.inspect_asm().values())).splitlines()
    first = next(k for k, line in enumerate(lines) if re.search(r"vfmadd\w+ps", line))
    start = max(k for k in range(first) if re.match(r"^\.LBB\d+_\d+:", lines[k]))
    end = next(k for k in range(first, len(lines)) if re.match(r"^\.LBB\d+_\d+:", lines[k]) or lines[k].strip().startswith("j"))
    loop = lines[start:end]
    fmas = [line for line in loop if "vfmadd" in line]
    lanes = {"xmm": 4, "ymm": 8, "zmm": 16}[re.findall(r"[xyz]mm", fmas[0])[-1]]
    assert len(fmas) * lanes == per_step, "\n".join(loop)
    spills = [line for line in loop if "(%rsp)" in line and re.search(r"[xyz]mm", line)]
    assert not spills, "vector registers spill to the stack in the reduction loop:\n" + "\n".join(loop)
    if call in (_vector_tile_call, _vector_dots_call) and "avx512f" in open("/proc/cpuinfo").read():
        assert lanes == 16, "v5's micro-kernels must use 512-bit registers on an AVX-512 CPU:\n" + "\n".join(loop)


def _outer_call(mo, cb):
    """The same for v6's ``tile_outer`` (mo vectors of channels x the 3x3 taps of cb channels) on ones:
    a block of 2 rows x 3 pixels of gy^T, 6 products per weight, added to ones."""
    from kernels.conv2d.microkernels import tile_outer

    def kernel(gt, x, rows, cols, out):  # rows and cols are arguments: constants would unroll the loops
        tile_outer(x, gt.ctypes.data, cols * mo * 16, mo * 16, x.ctypes.data, 100, 10, rows, cols, out.ctypes.data, out.shape[1], mo, cb,
                   3, 3)

    out = np.ones((cb * 9, mo * 16), np.float32)
    args = (np.ones(2 * 3 * mo * 16, np.float32), np.ones(400, np.float32), 2, 3, out)
    return kernel, args, np.full(out.shape, 7.0), mo * cb * 9 * 16


def _outer_block_call(cpu):
    return _outer_call(cpu.MO6, 1)


def _outer_channels_call(cpu):
    return _outer_call(1, cpu.CB6)


@pytest.mark.parametrize("call", [_outer_block_call, _outer_channels_call], ids=["v6-vectors", "v6-channels"])
def test_cpu_v6_outer_products_keep_their_accumulators_in_registers(call):
    """v6's tile_outer, both block shapes it runs, in its innermost (pixel) loop: as above."""
    test_cpu_micro_kernels_keep_their_accumulators_in_registers(call)


# v6 (grad_weight of a float32 3x3 stride-1 conv as outer products) runs when Og and Wo are whole
# vectors (16 values) and Cg >= 8. Og = 48: a block of MO6 = 2 vectors and one of 1, which takes the
# taps of CB6 = 3 channels at a time: Cg = 10 is 3 + 3 + 3 + 1; two groups of Og = 48 and Cg = 8 (3 + 3 + 2).
# Padding (1, 0) on top, 2 left and 0 right crops the input's last column (Wo = W + 2 - 2 = 16).
# _TAPS_BAND_BYTES = 1 gives bands of one row (items split mid-image between threads); 24192 bytes are
# 3 band rows of the two-group case ((16 + 96) * 18 * 4 bytes each): bands of 3 and a ragged 2 out of
# Ho = 5, and one band of 5 for the other; _OUTER_BYTES = 1 makes each tile_outer call one row, the default several.
@pytest.mark.parametrize("dtype, c_out, cg, groups", [(np.float32, 48, 10, 1), (np.float32, 96, 8, 2)])
@pytest.mark.parametrize("band_bytes, outer_bytes", [(1, 1), (24192, 16 << 10)])
@pytest.mark.parametrize("threads", ["all", "one"])
def test_cpu_v6_grad_weight_covers_every_block(monkeypatch, dtype, c_out, cg, groups, band_bytes, outer_bytes, threads):

    cpu = pytest.importorskip("kernels.conv2d.cpu")
    monkeypatch.setattr(cpu, "_TAPS_BAND_BYTES", band_bytes)
    monkeypatch.setattr(cpu, "_OUTER_BYTES", outer_bytes)
    ran = []
    kernel = cpu._grad_weight_outer_kernel
    monkeypatch.setattr(cpu, "_grad_weight_outer_kernel", lambda *args: ran.append(1) or kernel(*args))
    case = dict(x_shape=(3, cg * groups, 6, 16), w_shape=(c_out, cg, 3, 3), args=((1, 1), ((1, 0), (2, 0)), (1, 1), groups))
    case["y_shape"] = (3, c_out, 5, 16)
    if band_bytes > 1:
        assert cpu._taps_band(cg * groups, c_out, (5, 16), (3, 3), (1, 1), 4)[0] == (3 if groups == 2 else 5)
    x, w, _, gy = arrays(case, dtype, 3)
    args = case["args"]
    with threads_on_poisoned_workspace(cpu, threads):
        gw = cpu.conv2d_grad_weight(x, gy, w.shape, *args, version=6)
    assert ran, "v6's own kernel did not run for this shape"
    assert gw.dtype == dtype
    assert_close(gw, ref.conv2d_grad_weight(x, gy, w.shape, *args), *conv_tol(dtype, case), name="gw")


def test_cpu_v6_falls_back_to_v5_where_it_does_not_apply(monkeypatch):
    """Strides, dilations, other kernel sizes, Og or Wo not whole vectors, Cg < 8, float64: v5's result, v6's kernel not run."""
    cpu = pytest.importorskip("kernels.conv2d.cpu")
    monkeypatch.setattr(cpu, "_grad_weight_outer_kernel", lambda *args: pytest.fail("v6's kernel ran"))
    rng = np.random.default_rng(4)
    f32, f64 = np.float32, np.float64
    for x_shape, w_shape, args, dtype in [
        ((2, 8, 6, 17), (16, 8, 3, 3), ((2, 1), ((1, 1), (1, 1)), (1, 1), 1), f32),   # stride 2
        ((2, 8, 6, 18), (16, 8, 3, 3), ((1, 1), ((2, 2), (2, 2)), (2, 2), 1), f32),   # dilation 2
        ((2, 8, 6, 16), (16, 8, 1, 1), ((1, 1), ((0, 0), (0, 0)), (1, 1), 1), f32),   # 1x1
        ((2, 8, 6, 16), (12, 8, 3, 3), ((1, 1), ((1, 1), (1, 1)), (1, 1), 1), f32),   # Og = 12
        ((2, 8, 6, 12), (16, 8, 3, 3), ((1, 1), ((1, 1), (1, 1)), (1, 1), 1), f32),   # Wo = 12
        ((2, 3, 6, 16), (16, 3, 3, 3), ((1, 1), ((1, 1), (1, 1)), (1, 1), 1), f32),   # Cg = 3
        ((2, 8, 6, 16), (16, 8, 3, 3), ((1, 1), ((1, 1), (1, 1)), (1, 1), 1), f64),   # float64
    ]:
        x = rng.standard_normal(x_shape).astype(dtype)
        y_shape = ref.conv2d_forward(x, np.zeros(w_shape, dtype), None, *args).shape
        gy = rng.standard_normal(y_shape).astype(dtype)
        np.testing.assert_array_equal(cpu.conv2d_grad_weight(x, gy, w_shape, *args, version=6),
                                      cpu.conv2d_grad_weight(x, gy, w_shape, *args, version=5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 16, 64, 64), (3, 5, 7, 1), (2, 3, 0, 4)], ids=["unet-l2", "odd", "empty"])
def test_cpu_grad_bias_is_the_sum_over_batch_and_pixels(dtype, shape):
    """The compiled sum (vector accumulators per plane, float64 across planes) against the float64 sum:
    within float32's rounding of a sum of up to 32K terms (relative to the sum of |gy|, the bound of any
    order's error), for a strided gy too (it is made contiguous first)."""
    cpu = pytest.importorskip("kernels.conv2d.cpu")
    rng = np.random.default_rng(9)
    gy = (rng.standard_normal(shape) + 0.5).astype(dtype)
    for g in (gy, gy.transpose(1, 0, 2, 3).copy().transpose(1, 0, 2, 3)):  # the second is not C-contiguous
        got = cpu.conv2d_grad_bias(g)
        assert got.dtype == dtype and got.shape == (shape[1],)
        exact = g.astype(np.float64).sum(axis=(0, 2, 3))
        scale = np.abs(g.astype(np.float64)).sum(axis=(0, 2, 3))
        eps = np.finfo(dtype).eps
        np.testing.assert_array_less(np.abs(got - exact), 64 * eps * scale + np.finfo(dtype).tiny)
