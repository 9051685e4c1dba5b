"""minseg.functional.interpolate (every backend) vs torch.nn.functional.interpolate:
forward and backward, whole tensors, both ways of giving the output size."""
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend
from minseg.functional import interpolate
from tests.helpers import assert_close, oracle_backends, torch_or_skip
from tests.kernels.test_interpolate import interp_cases

torch = torch_or_skip()
F = torch.nn.functional


def _compare(backend_name, x_np, gy_np, size=None, scale_factor=None, mode="nearest", align_corners=None):
    """Run both libraries on the same x and upstream gradient; compare y and dL/dx."""
    x = minseg.Tensor(x_np, requires_grad=True)
    with backend.using(backend_name):
        y = interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners)
        y.backward(minseg.Tensor(gy_np))
    tx = torch.tensor(np.ascontiguousarray(x_np), requires_grad=True)
    ty = F.interpolate(tx, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners)
    ty.backward(torch.from_numpy(gy_np))
    if mode == "bilinear":
        # y: two float32 products per axis (values ~N(0,1)), summed in another order: ~1e-7
        assert_close(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5, name="y")
    else:
        # nearest copies inputs: equal bit for bit iff every source index is torch's
        assert_close(y.numpy(), ty.detach().numpy(), rtol=0, atol=0, name="y")
    # gx: sums of <= ceil(Ho/H)*ceil(Wo/W) weighted float32 terms, order differs: 1e-4 abs
    assert_close(x.grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-4, name="gx")


@pytest.mark.parametrize("backend_name", oracle_backends())
@settings(max_examples=40)
@given(
    case=interp_cases(max_planes=2, max_side=12, max_size=25),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64]),
)
# align_corners=True with an output side of 1 maps that pixel to source 0 (torch: scale 0), not to
# the centre that the half-pixel rule (align_corners=False) would give; draws rarely pick it
@example(case=dict(shape=(1, 2, 4, 6), mode="bilinear", align_corners=True, size=(1, 5), scale_factor=None), seed=0, dtype=np.float32)
@example(case=dict(shape=(2, 1, 5, 3), mode="bilinear", align_corners=True, size=(4, 1), scale_factor=None), seed=1, dtype=np.float64)
def test_matches_torch(backend_name, case, seed, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case["shape"]).astype(dtype)
    size, sf = case["size"], case["scale_factor"]
    out = size if size is not None else tuple(math.floor(n * s) for n, s in zip(case["shape"][2:], sf))
    gy = rng.standard_normal(case["shape"][:2] + tuple(out)).astype(dtype)
    align_corners = case["align_corners"] if case["mode"] == "bilinear" else None
    _compare(backend_name, x, gy, size, sf, case["mode"], align_corners)


@pytest.mark.parametrize("backend_name", oracle_backends())
@pytest.mark.parametrize(
    "mode,align_corners", [("nearest", None), ("nearest-exact", None), ("bilinear", False), ("bilinear", True)]
)
def test_scale_factor_and_the_equivalent_size_map_coordinates_differently(backend_name, mode, align_corners):
    """scale_factor=1.7 on 7 pixels gives floor(11.9) = 11 outputs, but maps coordinates with
    1/1.7, not 7/11 (torch's rule when recompute_scale_factor is None). Both must match torch;
    for the modes where the two maps differ, minseg's two results must differ too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    gy = rng.standard_normal((2, 3, 11, 11)).astype(np.float32)
    _compare(backend_name, x, gy, scale_factor=1.7, mode=mode, align_corners=align_corners)
    _compare(backend_name, x, gy, size=11, mode=mode, align_corners=align_corners)
    with backend.using(backend_name):
        by_scale = interpolate(minseg.Tensor(x), scale_factor=1.7, mode=mode, align_corners=align_corners).numpy()
        by_size = interpolate(minseg.Tensor(x), size=(11, 11), mode=mode, align_corners=align_corners).numpy()
    assert by_scale.shape == by_size.shape == (2, 3, 11, 11)
    # align_corners=True ignores the scale: (in-1)/(out-1) either way
    assert np.array_equal(by_scale, by_size) == bool(align_corners)


@pytest.mark.parametrize("backend_name", oracle_backends())
@pytest.mark.parametrize("mode,align_corners", [("nearest", None), ("bilinear", False), ("bilinear", True)])
def test_non_contiguous_input(backend_name, mode, align_corners):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((3, 2, 9, 12)).astype(np.float32)
    x = base.transpose(1, 0, 3, 2)[:, :, ::2, 1::2]  # (2, 3, 6, 5), strided in every axis
    assert not x.flags.c_contiguous
    gy = rng.standard_normal((2, 3, 10, 13)).astype(np.float32)
    _compare(backend_name, x, gy, size=(10, 13), mode=mode, align_corners=align_corners)


SCALE_GRID = [0.3, 1 / 3, 0.5, 0.7, 0.9, 0.999, 1.0, 1.001, 1.05, 1.1, 1.3, 1.5, 1.7, 2.0, 2.04, 2.05, 2.5, 7 / 3, 3.0]


@pytest.mark.parametrize("backend_name", oracle_backends())
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_picks_torchs_source_pixel_for_every_small_size(backend_name, mode, dtype):
    """Exhaustive over in/out sizes <= 30 and a grid of scale factors: the float32 rounding that
    makes torch pick another pixel than exact arithmetic happens for ~1% of pairs (e.g. 26 -> 22),
    too rarely for random draws to find. Pixel values are their flat positions, so equality of
    the outputs is equality of the selected indices."""
    def check(x, **kwargs):
        with backend.using(backend_name):
            ours = interpolate(minseg.Tensor(x), mode=mode, **kwargs).numpy()
        theirs = F.interpolate(torch.from_numpy(x), mode=mode, **kwargs).numpy()
        np.testing.assert_array_equal(ours, theirs, err_msg=f"in {x.shape[2:]}, {kwargs}")

    # the source-index tables are axis_taps', shared by every backend, so the full sweep runs on the
    # reference; the cpu kernels' use of them is checked up to 8 pixels, the cuda kernels' up to 6
    # (1,470 calls would take minutes under the simulator, one Python thread per output pixel and a
    # block per call): sizes 4-6 still hold cases where torch's float32 rounding picks another pixel
    # than exact arithmetic (x 7/3 for nearest; x 0.9, 1.1 and 1.3 of 6 pixels for nearest-exact)
    largest = {"numpy": 30, "cuda": 6}.get(backend_name, 8)
    for n_in in range(1, largest + 1):
        x = np.arange(n_in * n_in, dtype=dtype).reshape(1, 1, n_in, n_in)
        for n_out in range(1, largest + 1):
            check(x, size=(n_out, n_out))
        for sf in SCALE_GRID:
            if math.floor(n_in * sf) >= 1:
                check(x, scale_factor=sf)
