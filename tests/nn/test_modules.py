"""nn: module bookkeeping, state_dict round trip, torch-default initialisation,
layers against torch with the same weights, and the models' shapes and gradients."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minseg
from minseg import backend, nn
from tests.helpers import assert_close, torch_or_skip


@pytest.fixture(autouse=True)
def numpy_backend():
    with backend.using("numpy"):
        yield


def rand(*shape, seed=0, dtype=np.float32):
    return minseg.tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


# ---------------------------------------------------------------- bookkeeping


def test_named_parameters_buffers_and_modes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2))
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "1.weight", "1.bias"]
    assert [n for n, _ in model.named_buffers()] == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert model.num_parameters() == 4 * 3 * 9 + 4 + 4
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    assert len(model) == 4 and isinstance(model[1], nn.BatchNorm2d)
    y = model(rand(2, 3, 5, 5))
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "BatchNorm2d" in repr(model)


def test_assigning_replacing_and_deleting_attributes_keeps_the_registries_in_step():
    # Attributes are read from the instance __dict__ (no __getattr__ per read); the registries decide
    # what named_parameters / named_buffers / children see. Every way of changing one must change both.
    conv = nn.Conv2d(2, 3, 1)
    new_weight = nn.Parameter(np.zeros((3, 2, 1, 1), np.float32))
    conv.weight = new_weight
    assert conv.weight is new_weight and dict(conv.named_parameters())["weight"] is new_weight
    conv.bias = None  # a parameter replaced by a plain value is no parameter any more
    assert conv.bias is None and [n for n, _ in conv.named_parameters()] == ["weight"]
    del conv.weight
    assert list(conv.named_parameters()) == [] and not hasattr(conv, "weight")
    bn = nn.BatchNorm2d(3)
    replacement = minseg.tensor(np.full(3, 2.0, np.float32))
    bn.running_var = replacement  # a registered buffer name stays a buffer
    assert bn.running_var is replacement and dict(bn.named_buffers())["running_var"] is replacement
    seq = nn.Sequential(nn.ReLU(), nn.ReLU())
    child = nn.Dropout(0.5)
    setattr(seq, "1", child)
    assert seq[1] is child and getattr(seq, "1") is child
    del seq.__dict__["0"]  # a registry entry Python's lookup cannot find still resolves (__getattr__)
    assert getattr(seq, "0") is seq._modules["0"]


@pytest.mark.parametrize("make", [lambda: nn.UNet(base_channels=4, depth=2), lambda: nn.UNet(base_channels=4, depth=2, upsampling="transpose"), lambda: nn.FCN(base_channels=4, depth=2)])
def test_state_dict_round_trip(make):
    minseg.manual_seed(1)
    a = make()
    x = rand(2, 3, 8, 8)
    a.train()
    a(x)  # move BatchNorm's running statistics away from their initial values
    a.eval()
    minseg.manual_seed(2)
    b = make().eval()
    state = a.state_dict()
    assert set(state) == {n for n, _ in a.named_parameters()} | {n for n, _ in a.named_buffers()}
    assert not np.array_equal(b(x).numpy(), a(x).numpy())
    b.load_state_dict(state)
    assert_close(b(x).numpy(), a(x).numpy(), rtol=0, atol=0, name="same weights, same output")
    key = "head.weight" if "head.weight" in state else "classifier.weight"
    state[key][...] = 0  # state_dict holds copies: the model is unchanged
    assert np.abs(a.state_dict()[key]).max() > 0


def test_load_state_dict_errors():
    conv = nn.Conv2d(3, 4, 3)
    state = conv.state_dict()
    with pytest.raises(KeyError, match="missing keys \\['bias'\\]"):
        conv.load_state_dict({"weight": state["weight"]})
    with pytest.raises(KeyError, match="unexpected keys \\['extra'\\]"):
        conv.load_state_dict(dict(state, extra=np.zeros(1)))
    with pytest.raises(ValueError, match="shape"):
        conv.load_state_dict(dict(state, weight=np.zeros((4, 3, 5, 5))))
    conv.load_state_dict({"weight": state["weight"]}, strict=False)


# ------------------------------------------------------------- initialisation


@pytest.mark.parametrize(
    "layer, fan_in",
    [
        (lambda: nn.Conv2d(64, 48, 3), 64 * 9),
        (lambda: nn.Conv2d(64, 64, 3, groups=4), 16 * 9),
        (lambda: nn.ConvTranspose2d(64, 48, 4, stride=2), 48 * 16),  # torch: fan_in from weight dim 1 = C_out
        (lambda: nn.ConvTranspose2d(64, 48, 2, groups=2), 24 * 4),
    ],
)
def test_default_init_is_torch_kaiming_uniform(layer, fan_in):
    minseg.manual_seed(0)
    m = layer()
    w, b = m.weight.numpy().astype(np.float64), m.bias.numpy().astype(np.float64)
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): sqrt(3) * sqrt(2 / 6) / sqrt(fan_in)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    # U(-B, B) has mean 0 and variance B^2/3. With n samples the sample variance has relative
    # standard deviation sqrt(0.8 / n) (uniform kurtosis 1.8) and the mean has std B/sqrt(3n):
    # 6 standard deviations make a false failure negligibly rare, while a wrong fan (x2) shifts the variance 2x.
    n = w.size
    assert abs(w.var() / (bound**2 / 3) - 1) < 6 * math.sqrt(0.8 / n)
    assert abs(w.mean()) < 6 * bound / math.sqrt(3 * n)
    assert np.abs(w).max() > bound * (1 - 10 / n)  # the full range is used
    torch = pytest.importorskip("torch")
    tw = torch.empty(w.shape)
    assert torch.nn.init._calculate_fan_in_and_fan_out(tw)[0] == fan_in


def test_batchnorm_init_and_manual_seed_reproducible():
    bn = nn.BatchNorm2d(5)
    assert_close(bn.weight.numpy(), np.ones(5), rtol=0, atol=0)
    assert_close(bn.bias.numpy(), np.zeros(5), rtol=0, atol=0)
    assert_close(bn.running_var.numpy(), np.ones(5), rtol=0, atol=0)
    minseg.manual_seed(3)
    a = nn.Conv2d(2, 2, 3).weight.numpy()
    minseg.manual_seed(3)
    assert np.array_equal(a, nn.Conv2d(2, 2, 3).weight.numpy())


# ------------------------------------------------------ layers against torch


def copy_to_torch(torch, ours, theirs):
    with torch.no_grad():
        for name, value in ours.state_dict().items():
            getattr(theirs, name).copy_(torch.from_numpy(value))


LAYERS = {
    "conv": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), lambda t: t.nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 9, 7)),
    "conv_groups_dil": (
        lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        lambda t: t.nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        (1, 4, 6, 6),
    ),
    "convT": (
        lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1),
        lambda t: t.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1),
        (2, 4, 5, 4),
    ),
    "bn_train": (lambda: nn.BatchNorm2d(3, momentum=0.3), lambda t: t.nn.BatchNorm2d(3, momentum=0.3), (4, 3, 5, 5)),
    "pool": (lambda: nn.MaxPool2d(3, stride=2, padding=1), lambda t: t.nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 8)),
    "avg_pool": (
        lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        lambda t: t.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        (2, 3, 7, 8),
    ),
    "adaptive_avg_pool": (lambda: nn.AdaptiveAvgPool2d((3, None)), lambda t: t.nn.AdaptiveAvgPool2d((3, None)), (2, 3, 7, 5)),
    "upsample_bilinear": (
        lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        lambda t: t.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        (1, 2, 5, 3),
    ),
    "upsample_nearest": (lambda: nn.Upsample(size=(7, 4)), lambda t: t.nn.Upsample(size=(7, 4)), (1, 2, 3, 3)),
    "relu": (lambda: nn.ReLU(), lambda t: t.nn.ReLU(), (2, 3, 4, 4)),
}


# Layers without a row above, and the test that covers them instead.
NOT_IN_LAYERS = {"Sequential": "a container (test_named_parameters_buffers_and_modes)", "Dropout": "random (test_dropout_train_and_eval)"}


def test_every_layer_is_exported_and_compared_with_torch():
    """A new layer in minseg/nn/layers.py must be in minseg.nn.__all__ and have a row in LAYERS."""
    from minseg.nn import layers

    defined = {n for n, v in vars(layers).items() if isinstance(v, type) and issubclass(v, nn.Module) and not n.startswith("_")}
    defined -= {"Module"}
    assert not defined - set(nn.__all__), f"add to minseg/nn/__init__.py (import and __all__): {sorted(defined - set(nn.__all__))}"
    compared = {type(make()).__name__ for make, _, _ in LAYERS.values()}
    missing = defined - compared - set(NOT_IN_LAYERS)
    assert not missing, f"add a (minseg layer, torch layer, input shape) row to LAYERS in {__file__}: {sorted(missing)}"


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_matches_torch(name, mode):
    torch = torch_or_skip()
    make, make_torch, shape = LAYERS[name]
    ours, theirs = make(), make_torch(torch)
    copy_to_torch(torch, ours, theirs)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    x = rand(*shape, seed=1)
    x.requires_grad_()
    tx = torch.tensor(x.numpy(), requires_grad=True)
    y, ty = ours(x), theirs(tx)
    # float32 sums of at most ~100 products: a few ulp apart (oracle tolerances of the project).
    assert_close(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5, name=f"{name} forward")
    g = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)
    y.backward(minseg.tensor(g))
    ty.backward(torch.from_numpy(g))
    assert_close(x.grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-4, name=f"{name} grad input")
    for pname, p in ours.named_parameters():
        assert_close(p.grad.numpy(), getattr(theirs, pname).grad.numpy(), rtol=1e-4, atol=1e-4, name=f"{name} grad {pname}")
    for bname, buf in ours.named_buffers():  # BatchNorm's running statistics and batch count
        assert_close(buf.numpy(), getattr(theirs, bname).numpy(), rtol=1e-5, atol=1e-6, name=f"{name} {bname}")


def test_dropout_train_and_eval():
    minseg.manual_seed(0)
    d = nn.Dropout(0.25)
    x = minseg.tensor(np.ones((64, 64), np.float32))
    y = d(x).numpy()
    kept = y != 0
    # 4096 Bernoulli(0.75) draws: std of the kept fraction is sqrt(.75*.25/4096) ~ 0.007; 6 sigma
    assert abs(kept.mean() - 0.75) < 0.045
    assert_close(y[kept], np.full(kept.sum(), 1 / 0.75, np.float32), rtol=1e-6, atol=0)
    d.eval()
    assert_close(d(x).numpy(), x.numpy(), rtol=0, atol=0)


# ------------------------------------------------------------------- models


@settings(max_examples=6)
@given(
    h=st.integers(1, 13),
    w=st.integers(1, 13),
    depth=st.integers(1, 3),
    model=st.sampled_from(["unet-bilinear", "unet-transpose", "fcn", "deeplab"]),
)
def test_models_map_any_size_to_logits_of_the_same_size(h, w, depth, model):
    minseg.manual_seed(0)
    if model == "fcn":
        net = nn.FCN(in_channels=2, num_classes=3, base_channels=2, depth=depth)
    elif model == "deeplab":
        net = nn.DeepLab(in_channels=2, num_classes=3, base_channels=2, depth=max(depth, 2))
    else:
        net = nn.UNet(in_channels=2, num_classes=3, base_channels=2, depth=depth, upsampling=model.split("-")[1])
    x = rand(2, 2, h, w)
    y = net(x)
    assert y.shape == (2, 3, h, w)  # padded to a multiple of 2**depth inside, cropped back
    y.sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


def test_unet_padding_does_not_change_divisible_inputs():
    minseg.manual_seed(0)
    net = nn.UNet(base_channels=2, depth=2).eval()
    x = rand(1, 3, 8, 12)
    full = net(x).numpy()
    assert full.shape == (1, 4, 8, 12)
    with pytest.raises(ValueError, match="expected a Tensor of shape \\(N, 3, H, W\\)"):
        net(rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="upsampling"):
        nn.UNet(upsampling="pixelshuffle")
    with pytest.raises(ValueError, match="unknown model"):
        nn.build_model("segformer")


def test_unet_structure():
    net = nn.UNet()
    names = {n for n, _ in net.named_parameters()}
    assert {"inc.0.weight", "down3.3.weight", "dec1.0.weight", "head.weight", "head.bias"} <= names
    assert net.dec1[0].in_channels == 16 + 32  # bilinear: upsampled 32 channels + the 16-channel skip
    assert nn.UNet(upsampling="transpose").dec1[0].in_channels == 32  # transposed conv halves 32 -> 16, + 16 skip


def test_deeplab_structure_output_stride_and_aspp():
    minseg.manual_seed(0)
    net = nn.DeepLab(base_channels=4, depth=3).eval()
    x = rand(2, 3, 64, 48)
    stem = net.stem(x)
    features = net.stage2(net.stage1(stem))
    assert stem.shape[2:] == (32, 24) and features.shape[2:] == (8, 6)  # output stride 2**depth = 8
    dilated = net.dilated(features)
    assert dilated.shape == features.shape  # the dilated blocks keep the resolution
    assert [b.body[0][0].dilation for b in net.dilated] == [2, 4]
    assert net.aspp.rates == (2, 4, 6) and [net.aspp.branch1[0].dilation, net.aspp.branch3[0].dilation] == [2, 6]
    assert net.aspp(dilated).shape == (2, 8, 8, 6)  # head width 2 * base_channels
    y = net(x)
    assert y.shape == (2, 4, 64, 48)
    with pytest.raises(ValueError, match="depth >= 2"):
        nn.DeepLab(depth=1)
    assert nn.build_model("deeplab", num_classes=3, base_channels=2, depth=2).config["rates"] == (2, 4, 6)
