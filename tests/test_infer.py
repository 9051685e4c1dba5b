"""Sliding-window inference (minseg.infer.predict): exact against one pass for a
translation-equivariant model, close to one pass for the U-Net, windows that cover
the image, Gaussian weights, flip test-time augmentation and bad arguments."""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import minseg
from minseg import backend, nn
from minseg.data import SyntheticScenes
from minseg.infer import gaussian_weights, predict, softmax_inplace, window_starts


@pytest.fixture(autouse=True)
def numpy_backend():
    with backend.using("numpy"):
        yield


def one_pass(model, image):
    return model.eval()(minseg.tensor(image[None])).numpy()[0]


@given(size=st.integers(1, 200), window=st.integers(1, 64), data=st.data())
@example(size=64, window=64, data=48)
@example(size=65, window=64, data=48)
def test_windows_cover_the_image_and_stay_inside(size, window, data):
    stride = data if isinstance(data, int) else data.draw(st.integers(1, window), label="stride")
    starts = window_starts(size, window, stride)
    covered = np.zeros(max(size, window), bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered[:size].all()
    assert starts == sorted(set(starts)) and starts[0] == 0
    if size >= window:  # no window hangs over the edge; the last one ends on it
        assert starts[-1] + window == size
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="leave no gap"):
        window_starts(size, window, window + 1)


@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    window=st.integers(1, 24),
    overlap=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
    blend=st.sampled_from(["mean", "gaussian"]),
    batch_size=st.integers(1, 5),
)
@example(h=50, w=3, window=16, overlap=0.5, blend="gaussian", batch_size=2)  # image thinner than a window: padded
def test_a_1x1_convolution_gives_exactly_the_one_pass_result(h, w, window, overlap, blend, batch_size):
    # A 1x1 conv sees one pixel: every window computes the same logits at a pixel, and the
    # float64 blend (sum k v / sum k) of identical values v returns v exactly. Weights that
    # are small integers and pixels that are multiples of 1/256 make every product and sum of
    # the conv exact, so the conv kernel's summation order (which BLAS may choose per window
    # shape) cannot differ either: any mismatch is the sliding window's.
    rng = np.random.default_rng(h * 41 + w)
    model = nn.Conv2d(3, 4, 1)
    model.weight.data[...] = rng.integers(-4, 5, model.weight.shape)
    model.bias.data[...] = rng.integers(-8, 9, model.bias.shape) / 8
    image = (rng.integers(0, 256, (3, h, w)) / 256).astype(np.float32)
    out = predict(model, image, window=window, overlap=overlap, blend=blend, batch_size=batch_size, progress=False)
    assert out.shape == (4, h, w) and out.dtype == np.float32
    np.testing.assert_array_equal(out, one_pass(model, image))
    # torch-default random weights: the same up to the conv's float32 round-off on another shape
    minseg.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    image = rng.random((3, h, w)).astype(np.float32)
    out = predict(model, image, window=window, overlap=overlap, blend=blend, batch_size=batch_size, progress=False)
    np.testing.assert_allclose(out, one_pass(model, image), rtol=1e-6, atol=1e-7)


def test_unet_interior_pixels_agree_with_one_pass():
    minseg.manual_seed(0)
    model = nn.UNet(base_channels=4, depth=2).eval()
    image = SyntheticScenes(1, size=96, seed=0)[0][0]
    full = one_pass(model, image)
    # a window as large as the image is the one pass itself
    np.testing.assert_array_equal(predict(model, image, window=96, progress=False), full)
    spread = full.std()
    for blend, bound in (("mean", 0.1), ("gaussian", 0.01)):
        out = predict(model, image, window=48, overlap=0.5, blend=blend, progress=False)
        # Windows differ from one pass only where a window's zero padding reaches a pixel's
        # receptive field (44 px for this U-Net). Measured: max |diff| / std(logits) is 0.03
        # (mean) and 1e-4 (gaussian, which down-weights window borders); the bounds leave ~3x
        # headroom, and every pixel must keep its class.
        interior = np.abs(out - full)[:, 8:-8, 8:-8]
        assert interior.max() < bound * spread, (blend, interior.max() / spread)
        np.testing.assert_array_equal(out.argmax(0), full.argmax(0))


def test_gaussian_weights_peak_in_the_middle():
    k = gaussian_weights((8, 6))
    assert k.shape == (8, 6) and k.max() <= 1 and k.min() > 0
    np.testing.assert_allclose(k, k[::-1, ::-1])  # symmetric
    assert k[3:5, 2:4].min() == k.max()  # the four central pixels (even sizes) share the peak
    # sigma = n / 8: a pixel one sigma from the centre along H (and central along W) weighs exp(-1/2)
    np.testing.assert_allclose(gaussian_weights((17, 1))[8 + 2, 0] / gaussian_weights((17, 1))[8, 0], np.exp(-(2**2) / (2 * (17 / 8) ** 2)))


def test_flip_tta_averages_the_flipped_predictions():
    minseg.manual_seed(0)
    model = nn.Conv2d(3, 2, 3, padding=1).eval()  # an asymmetric kernel: not flip-equivariant
    image = np.random.default_rng(0).random((3, 12, 10)).astype(np.float32)
    expected = np.mean(
        [np.flip(one_pass(model, np.ascontiguousarray(np.flip(image, axes))), axes) for axes in ((), (1,), (2,), (1, 2))],
        axis=0,
    )
    out = predict(model, image, window=(12, 10), tta="flip", progress=False)  # one window: the whole image
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)  # float32 sums of 4 terms in another order
    assert np.abs(out - predict(model, image, window=(12, 10), progress=False)).max() > 1e-3  # TTA changed something
    conv1 = nn.Conv2d(3, 2, 1).eval()  # flip-equivariant: TTA averages 4 equal predictions
    np.testing.assert_allclose(predict(conv1, image, window=5, tta="flip", progress=False), one_pass(conv1, image), rtol=1e-6, atol=1e-6)


def test_default_window_is_the_training_tile_size():
    calls = []

    class Recorder(nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x

    model = Recorder()
    model.tile_size = 16
    predict(model, np.zeros((3, 40, 40), np.float32), batch_size=3, progress=False)
    assert {c[2:] for c in calls} == {(16, 16)} and all(c[0] <= 3 for c in calls)
    assert sum(c[0] for c in calls) == len(window_starts(40, 16, 12)) ** 2  # overlap 0.25: stride 12


def test_softmax_inplace():
    logits = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32) * 30
    expected = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    out = softmax_inplace(logits)
    assert out is logits
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(image=np.zeros((5, 5), np.float32)), ValueError, r"image must be \(C, H, W\)"),
        (dict(image=np.zeros((3, 5, 5), np.uint8)), TypeError, "image must be float32 or float64"),
        (dict(window=0), ValueError, "window must be a positive int"),
        (dict(overlap=1.0), ValueError, r"overlap must be in \[0, 1\)"),
        (dict(blend="max"), ValueError, "blend must be one of"),
        (dict(tta="rotate"), ValueError, "tta must be one of"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = dict(image=np.zeros((3, 5, 5), np.float32), window=4)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        predict(nn.Conv2d(3, 2, 1), progress=False, **args)


@pytest.mark.slow
def test_predict_memory_benchmark_runs(tmp_path):
    """``python -m benchmarks.predict_memory --quick`` end to end (two ``minseg predict`` processes);
    the CLI's sliding and one-pass paths are covered fast by tests/e2e/test_real_imagery.py."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.predict_memory", "--quick", "--json", str(tmp_path / "m.json")],
        cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "m.json").read_text())
    for run in report["runs"].values():
        assert run["peak_rss_mib"] > 0 and run["outputs"] == ["big_mask.png", "big_overlay.png"]
    assert "one pass / sliding" in proc.stdout
