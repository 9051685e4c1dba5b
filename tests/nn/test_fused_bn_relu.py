"""Sequential runs BatchNorm2d directly followed by ReLU as one fused call (F.batch_norm_relu):
fused and unfused models give the same outputs, gradients and running statistics on every backend.

Forward outputs and running statistics are compared bit for bit: the fused kernel evaluates the
same float expression as the batch norm, then applies the same comparison as the relu. Gradients
within tests.helpers.tol: the fused backward adds the masked gradient inside its reduction loop,
which a compiler may vectorise in another order than the unfused one."""
import numpy as np
import pytest

import minseg
from minseg import backend, nn
from minseg import functional as F
from tests.helpers import assert_close, tol


def _counting(monkeypatch):
    """Count the calls of F.batch_norm_relu (the layers call it through the module attribute)."""
    calls = []
    fused = F.batch_norm_relu

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm_relu", counted)
    return calls


def _run(model, x, gy, steps):
    """``steps`` training steps (forward, backward), then an eval forward: everything to compare."""
    out = []
    model.train()
    for _ in range(steps):
        xt = minseg.Tensor(x, requires_grad=True)
        y = model(xt)
        y.backward(minseg.Tensor(gy))
        out += [("y", y.numpy()), ("gx", xt.grad.numpy())]
        out += [(f"grad {n}", p.grad.numpy()) for n, p in model.named_parameters()]
        model.zero_grad()
    out += [(n, b.numpy()) for n, b in model.named_buffers()]
    model.eval()
    out.append(("eval y", model(minseg.Tensor(x)).numpy()))
    return out


# Sequential's fusion is backend-agnostic; the fused kernels of every backend, cuda included, are
# checked against the reference in tests/kernels/test_batch_norm_relu.py and tests/oracle.
@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
def test_fused_sequential_matches_unfused(backend_name, monkeypatch):
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 4, 4)) * 2 + 1).astype(np.float32)
    gy = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    results = []
    for fuse in (True, False):
        # fused pairs: (0, 1) and (3, 4); 5 is a BatchNorm2d with no ReLU after it
        model = nn.Sequential(
            nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.BatchNorm2d(3),
            fuse=fuse,
        )
        params = np.random.default_rng(5)  # the same for both models; not the initial ones and zeros
        for p in model.parameters():
            p.data[...] = params.standard_normal(p.shape).astype(np.float32)
        with backend.using(backend_name):
            results.append(_run(model, x, gy, steps=2))
        assert len(calls) == (2 * 2 + 2 if fuse else 0)  # two pairs in each of 2 training + 1 eval forward
        calls.clear()
    rtol, atol = tol(np.float32)
    for (name, a), (name_b, b) in zip(*results):
        assert name == name_b
        if name.startswith("grad") or name == "gx":
            assert_close(a, b, rtol, atol, name=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_only_exact_batch_norm_and_relu_classes_fuse(monkeypatch):
    """A subclass may compute something else (SyncBatchNorm2d sums over ranks): it runs on its own."""
    calls = _counting(monkeypatch)

    class Doubled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    x = minseg.Tensor(np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(np.float32))
    with backend.using("numpy"):
        y = nn.Sequential(Doubled(2), nn.ReLU())(x)
        expected = F.relu(F.batch_norm(x, None, None, training=True) * 2)
    assert not calls
    np.testing.assert_array_equal(y.numpy(), expected.numpy())


@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
def test_unet_fused_and_unfused_train_alike(backend_name):
    """The U-Net's double convs and its resize + join fuse by default; switching every Sequential and
    the U-Net itself to fuse=False changes nothing."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    results = []
    for fuse in (True, False):
        minseg.manual_seed(0)
        model = nn.UNet(base_channels=4, depth=2)
        for m in model.modules():
            if isinstance(m, (nn.Sequential, nn.UNet)):
                m.fuse = fuse
        gy = np.random.default_rng(3).standard_normal((2, model(minseg.Tensor(x)).shape[1], 8, 8)).astype(np.float32)
        with backend.using(backend_name):
            results.append(_run(model, x, gy, steps=1))
    assert [n for n, _ in results[0]] == [n for n, _ in results[1]]
    # conv outputs feed the batch norms: the gradients' float32 drift grows through the layers
    for (name, a), (_, b) in zip(*results):
        assert_close(a, b, 1e-4, 1e-4, name=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
def test_conv_batch_norm_chain_is_the_unfused_calls_bit_for_bit(backend_name, training):
    """Conv2d, BatchNorm2d[, ReLU] layers in a row in a Sequential run as one graph node (in training a
    Conv2dBatchNormLayersFunction: one kernel call each way for all the layers; in eval an
    autograd.Chain of one Conv2dBatchNormFunction per layer): the same kernels, so outputs, gradients
    and running statistics equal the separate calls exactly."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 3, 6, 6)) * 2 + 1).astype(np.float32)
    gy = rng.standard_normal((2, 4, 2, 2)).astype(np.float32)

    def make():
        minseg.manual_seed(1)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.MaxPool2d(2),
        )
        for bn in (model[1], model[4]):  # running statistics other than the initial 0 and 1 (eval normalises with them)
            bn.running_mean.data[...] = np.linspace(-0.5, 0.5, 4, dtype=np.float32)
            bn.running_var.data[...] = np.linspace(0.5, 2.0, 4, dtype=np.float32)
        return model.train(training)

    def separate(model, xt):
        c0, bn0, _, c1, bn1, pool = model
        h = F.batch_norm_relu(F.conv2d(xt, c0.weight, c0.bias, 1, 1), *bn0._step_arguments())
        return pool(F.batch_norm(F.conv2d(h, c1.weight, None), *bn1._step_arguments()))

    results = []
    with backend.using(backend_name):
        for run in (lambda m, xt: m(xt), separate):
            model, xt = make(), minseg.Tensor(x, requires_grad=True)
            y = run(model, xt)
            if run is not separate:  # the pool's input is one node for (conv, bn) twice, made from x itself
                chained = y._ctx.inputs[0]._ctx
                if training:
                    assert chained.function is F.Conv2dBatchNormLayersFunction
                    assert len(chained.saved_tensors) == 2
                else:
                    assert chained.function is minseg.autograd.Chain
                    assert [part.function for part in chained.parts] == [F.Conv2dBatchNormFunction] * 2
                assert chained.inputs[0] is xt
            y.backward(minseg.Tensor(gy))
            out = [("y", y.numpy()), ("gx", xt.grad.numpy())]
            out += [(f"grad {n}", p.grad.numpy()) for n, p in model.named_parameters()]
            out += [(n, b.numpy()) for n, b in model.named_buffers()]
            results.append(out)
    for (name, a), (_, b) in zip(*results):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_chain_gradients_are_the_derivatives_of_its_steps():
    # float64 gradcheck through a conv -> batch norm -> relu chain, in training (batch statistics)
    rng = np.random.default_rng(6)
    x = minseg.Tensor(rng.standard_normal((2, 2, 4, 4)), requires_grad=True)
    w = minseg.Tensor(rng.standard_normal((3, 2, 3, 3)) * 0.5, requires_grad=True)
    b = minseg.Tensor(rng.standard_normal(3), requires_grad=True)
    g = minseg.Tensor(rng.uniform(0.5, 1.5, 3), requires_grad=True)
    beta = minseg.Tensor(rng.standard_normal(3), requires_grad=True)
    with backend.using("numpy"):
        minseg.gradcheck(
            lambda x, w, b, g, beta: F.conv2d_batch_norm(x, w, b, 1, 1, 1, 1, None, None, g, beta, training=True, relu=True),
            [x, w, b, g, beta],
        )
        # only the conv weight wants a gradient: the chain still reaches it through the batch norm
        x.requires_grad, b.requires_grad, g.requires_grad, beta.requires_grad = False, False, False, False
        minseg.gradcheck(lambda x, w: F.conv2d_batch_norm(x, w, None, 1, 0, 1, 1, None, None, training=True), [x, w])


def test_layers_gradients_when_only_a_later_layer_wants_one():
    """Two layers as one node, where the input and the first layer are frozen: backward starts at the
    second layer (the first is left out) and its gradients are still the derivatives (float64 gradcheck);
    then every input wants one."""
    rng = np.random.default_rng(8)
    x = minseg.Tensor(rng.standard_normal((2, 2, 4, 4)))
    w0, w1 = (minseg.Tensor(rng.standard_normal((3, c, 3, 3)) * 0.5) for c in (2, 3))
    g1 = minseg.Tensor(rng.uniform(0.5, 1.5, 3), requires_grad=True)

    def two_layers(x, w0, w1, g1):
        layers = [(w0, None, 1, 1, 1, 1, None, None, None, None, True, 0.1, 1e-5, True),
                  (w1, None, 1, 1, 1, 1, None, None, g1, None, True, 0.1, 1e-5, False)]
        return F.conv2d_batch_norm_layers(x, layers)

    with backend.using("numpy"):
        assert two_layers(x, w0, w1, g1)._ctx.function is F.Conv2dBatchNormLayersFunction
        w1.requires_grad = True
        minseg.gradcheck(two_layers, [x, w0, w1, g1])
        assert w0.grad is None and x.grad is None  # frozen: no gradient reached them
        x.requires_grad = w0.requires_grad = True
        minseg.gradcheck(two_layers, [x, w0, w1, g1])


@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
def test_unet_resize_and_join_as_one_op_is_the_two_ops_bit_for_bit(backend_name):
    """With bilinear upsampling each decoder's input is one F.interpolate_cat node (the resize written into
    the joined map), and its outputs and gradients equal Upsample then F.cat (UNet.fuse = False) exactly;
    a transpose-conv U-Net never takes it."""
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)  # 4 -> 8 -> 16: the x2 paths
    results = []
    with backend.using(backend_name):
        for fuse in (True, False):
            minseg.manual_seed(0)
            model = nn.UNet(base_channels=4, depth=2)
            model.fuse = fuse
            xt = minseg.Tensor(x, requires_grad=True)
            y = model(xt)
            joined = y._ctx.inputs[0]._ctx.inputs[0]._ctx  # head <- dec1 (one layers node) <- its input
            assert joined.function is (F.InterpolateCatFunction if fuse else F.CatFunction)
            y.backward(minseg.Tensor(np.ones(y.shape, np.float32)))
            results.append([y.numpy(), xt.grad.numpy()] + [p.grad.numpy() for p in model.parameters()])
        for a, b in zip(*results):
            np.testing.assert_array_equal(a, b)
        minseg.manual_seed(0)
        model = nn.UNet(base_channels=4, depth=1, upsampling="transpose")
        y = model(minseg.Tensor(x))
        assert y._ctx.inputs[0]._ctx.inputs[0]._ctx.function is F.CatFunction
