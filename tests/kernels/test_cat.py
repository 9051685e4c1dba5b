"""cat kernels: every backend module vs the NumPy reference, and the reference's adjoint identity."""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.helpers import assert_close, kernel_modules, load, reference
from tests.helpers import cat_pieces as pieces

REF = reference("cat")
MODULES = kernel_modules("cat")
ALL_MODULES = [pytest.param("kernels.cat.reference", id="numpy")] + MODULES


@pytest.mark.parametrize("modname", MODULES)
@given(
    base=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
    dim_seed=st.integers(0, 3),
    sizes=st.lists(st.integers(0, 4), min_size=1, max_size=4),  # 0: an empty piece, as torch allows
    needs_seed=st.integers(0, 15),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
# several CUDA blocks with a partial last one (a band 300 columns wide: 10 blocks of 32 columns)
@example(base=(2, 3, 100), dim_seed=1, sizes=[3, 1], needs_seed=3, dtype=np.float32, seed=0)
# pieces that need no gradient get None, the others their band, whatever the order
@example(base=(2, 3), dim_seed=0, sizes=[1, 2, 1], needs_seed=5, dtype=np.float64, seed=1)
def test_cat_matches_reference(modname, base, dim_seed, sizes, needs_seed, dtype, seed):
    mod = load(modname)
    dim = dim_seed % len(base)
    xs = pieces(base, dim, sizes, dtype, seed)
    y = mod.cat_forward(xs, dim)
    assert_close(y, REF.cat_forward(xs, dim), 0, 0, name="y")  # copies: exact (poison shows up as NaN)
    assert np.asarray(y).dtype == dtype
    gy = np.random.default_rng(seed + 1).standard_normal(np.asarray(y).shape).astype(dtype)
    needs = tuple(bool(needs_seed >> i & 1) for i in range(len(sizes)))
    got, want = mod.cat_backward(gy, tuple(sizes), dim, needs), REF.cat_backward(gy, tuple(sizes), dim, needs)
    assert len(got) == len(sizes)
    for i, (g, w, need) in enumerate(zip(got, want, needs)):
        if not need:
            assert g is None and w is None, f"piece {i} needs no gradient"
            continue
        assert_close(g, w, 0, 0, name=f"gradient of piece {i}")
        assert np.asarray(g).flags.c_contiguous and np.asarray(g).dtype == dtype


@pytest.mark.parametrize("modname", [m for m in MODULES if m.id == "cpu"])
def test_cpu_cat_splits_long_rows_into_blocks(modname):
    """Rows longer than cpu.BLOCK numbers are copied in several blocks; uneven cuts must cover every column."""
    mod = load(modname)
    xs = pieces((3, 1, 7001), 1, [3, 2, 4], np.float32, 0)  # bands of 21003, 14002, 28004 numbers per row
    assert 3 * 7001 > mod.BLOCK
    y = mod.cat_forward(xs, 1)
    assert_close(y, REF.cat_forward(xs, 1), 0, 0, name="y")
    gy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    for i, (g, w) in enumerate(zip(mod.cat_backward(gy, (3, 2, 4), 1, (True,) * 3), REF.cat_backward(gy, (3, 2, 4), 1, (True,) * 3))):
        assert_close(g, w, 0, 0, name=f"gradient of piece {i}")


@pytest.mark.parametrize("modname", [m for m in MODULES if m.id == "cuda"])
def test_cuda_cat_takes_tall_bands_in_several_launches(modname, monkeypatch):
    """Bands taller than one grid (ROWS_PER_LAUNCH rows, half a million on a GPU) run in several launches;
    lowered to 8 rows here, 20 rows take three, the last partial."""
    mod = load(modname)
    monkeypatch.setattr(mod, "ROWS_PER_LAUNCH", 8)
    xs = pieces((4, 5, 2, 3), 2, [2, 1], np.float32, 4)  # 20 rows of bands 6 and 3 columns wide
    assert_close(mod.cat_forward(xs, 2), REF.cat_forward(xs, 2), 0, 0, name="y")
    gy = np.random.default_rng(5).standard_normal((4, 5, 3, 3)).astype(np.float32)
    for i, (g, w) in enumerate(zip(mod.cat_backward(gy, (2, 1), 2, (True, True)), REF.cat_backward(gy, (2, 1), 2, (True, True)))):
        assert_close(g, w, 0, 0, name=f"gradient of piece {i}")


@pytest.mark.parametrize("modname", ALL_MODULES)
def test_cat_backward_is_the_adjoint_of_the_forward(modname):
    """<cat(x_1, ..., x_k), g> = sum_i <x_i, gx_i>: the backward reads back exactly where the forward wrote."""
    mod = load(modname)
    xs = pieces((2, 3, 4), 2, [1, 3, 2], np.float64, 2)
    gy = np.random.default_rng(3).standard_normal((2, 3, 6))
    gxs = mod.cat_backward(gy, (1, 3, 2), 2, (True, True, True))
    lhs = float((np.asarray(mod.cat_forward(xs, 2)) * gy).sum())
    rhs = sum(float((x * np.asarray(g)).sum()) for x, g in zip(xs, gxs))
    assert lhs == pytest.approx(rhs, rel=1e-12)
