"""What the per-step Python cuts must keep: the same results, the same errors, no arrays held by a freed graph.

Issue 11 (deliverable 3) made the code that runs around every kernel call cheaper:
``Function.apply``, ``Tensor()``, the backward walk's checks, ``Context.free``, the
argument checks of ``functional.py`` and the SGD update. These tests pin down what
those shortcuts must not change.
"""
import numpy as np
import pytest

import minseg
from kernels.shapes import pool_output_size
from minseg import Tensor, optim, tensor
from minseg import functional as F
from minseg.nn import Parameter, UNet
from tests.helpers import assert_close

# --------------------------------------------------------------- max_pool2d's window check


def test_undilated_pool_windows_always_read_the_input():
    """Why max_pool2d tests only dilated axes for windows that read padding alone: without
    dilation no window can, for every size, kernel, stride, padding <= kernel // 2 and ceil_mode
    (exhaustive over small values, where the edge cases live)."""
    checked = 0
    for size in range(1, 10):
        for k in range(1, 6):
            for s in range(1, 5):
                for p in range(k // 2 + 1):
                    for ceil_mode in (False, True):
                        out = pool_output_size(size, k, s, p, 1, ceil_mode)
                        for i in range(max(out, 0)):
                            first, last = i * s - p, i * s - p + k - 1  # the window's taps, consecutive
                            assert first < size and last >= 0, (size, k, s, p, ceil_mode, i)
                            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("dilation", [(5, 1), (1, 5)])
def test_a_dilated_axis_is_still_checked(dilation):
    """Only the dilated axis can hold a window of padding alone; it is found on either axis."""
    # along the dilated axis, 4 pixels: window 0 has taps at -1 and 4, both in the padding
    x = tensor(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="reads only padding"):
        F.max_pool2d(x, 2, stride=1, padding=1, dilation=dilation)


# ------------------------------------------------------------------------- Tensor, apply


def test_tensor_of_an_ndarray_shares_it_and_of_anything_else_converts():
    a = np.arange(3, dtype=np.float32)
    assert Tensor(a).data is a  # no copy, no conversion (what every Function output takes)
    for value, dtype in ((np.float32(2.0), np.float32), ([1.0, 2.0], np.float64), (3, np.int64)):
        t = Tensor(value)
        assert type(t.data) is np.ndarray and t.data.dtype == dtype
        np.testing.assert_array_equal(t.data, np.asarray(value))
    with pytest.raises(TypeError, match="floating-point"):
        Tensor(np.arange(3), requires_grad=True)


def test_apply_records_inputs_and_which_want_a_gradient():
    a = tensor(np.ones(3), requires_grad=True)
    b = tensor(np.ones(3))
    y = F.CatFunction.apply(a, b, dim=0)
    assert y.requires_grad and y._ctx.inputs == (a, b) and y._ctx.needs_input_grad == (True, False)
    assert type(y._ctx.inputs) is tuple
    with minseg.no_grad():
        assert not F.CatFunction.apply(a, b, dim=0).requires_grad
    with pytest.raises(TypeError, match="needs at least one Tensor"):
        F.CatFunction.apply(np.ones(3), dim=0)


def test_wrong_gradient_shape_is_reported():
    class Bad(minseg.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return (g[:1],)

    y = Bad.apply(tensor(np.ones(3), requires_grad=True)).sum()
    with pytest.raises(RuntimeError, match=r"Bad.backward returned a gradient of shape \(1,\) for an input of shape \(3,\)"):
        y.backward()


def test_a_freed_graph_holds_no_arrays():
    """After backward (no retain_graph) every node keeps its links and drops the rest: saved arrays,
    kernel handles, the indices and shapes the forward stored."""
    minseg.manual_seed(0)
    with minseg.backend.using("numpy"):
        model = UNet(in_channels=1, num_classes=3, base_channels=2, depth=1)
        x = tensor(np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32))
        t = tensor(np.random.default_rng(1).integers(0, 3, (2, 8, 8)))
        loss = F.cross_entropy(model(x), t)
        nodes, stack = [], [loss]
        while stack:
            node = stack.pop()
            if node._ctx is not None and all(node._ctx is not n for n in nodes):
                nodes.append(node._ctx)
                stack.extend(i for i in node._ctx.inputs if i is not None)
        # 3 double convs (one node each, in training), max-pool, interpolate + cat (one node), the head conv, cross-entropy
        assert len(nodes) == 7 and sum(n.function is F.Conv2dBatchNormLayersFunction for n in nodes) == 3
        assert sum(n.function is F.InterpolateCatFunction for n in nodes) == 1
        loss.backward()
    for ctx in nodes:
        assert vars(ctx).keys() == {"function", "inputs", "needs_input_grad", "_saved", "freed"}, ctx.function
        assert ctx.freed and ctx._saved == ()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


# ----------------------------------------------------------------------------------- SGD


def sgd_reference(p, grads, lr, momentum, dampening, weight_decay, nesterov):
    """The update rule of optim.py's docstring, written out with fresh arrays (no in-place tricks)."""
    p, buf, out = p.copy(), None, []
    for g in grads:
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
        out.append(p)
    return out


SGD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.1, weight_decay=0.01),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_in_place_update_matches_the_formula_and_leaves_grad_alone(options, dtype):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 4)).astype(dtype)
    grads = [rng.standard_normal((3, 4)).astype(dtype) for _ in range(5)]
    kw = dict(dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False), **options)
    want = sgd_reference(p0.astype(np.float64), [g.astype(np.float64) for g in grads], **kw)
    p = Parameter(p0.copy())
    opt = optim.SGD([p], **options)
    for step, g in enumerate(grads):
        p.grad = Tensor(g.copy())
        opt.step()
        # the update must not touch the gradient (it may be a view another .grad shares)
        np.testing.assert_array_equal(p.grad.data, g)
        assert p.data.dtype == dtype
        # float32: a few roundings of O(1) values per step, 5 steps: well under 1e-5 relative
        rtol, atol = (1e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-14)
        assert_close(p.data, want[step], rtol=rtol, atol=atol, name=f"p after step {step + 1}")


def test_a_unet_step_copies_no_parameter_gradient(monkeypatch):
    """No two parameters of a U-Net share a gradient array, so backward stores every one without a copy
    (GradBuffers copies only arrays handed out twice; the caller's seed is held so that its id, once
    freed, cannot make a new gradient look handed out)."""
    import importlib

    tensor_module = importlib.import_module("minseg.tensor")
    accumulate, copied = tensor_module.GradBuffers.accumulate, []

    def spy(self, current, g, dtype):
        out = accumulate(self, current, g, dtype)
        if current is None and out.data is not g:
            copied.append(g.shape)
        return out

    monkeypatch.setattr(tensor_module.GradBuffers, "accumulate", spy)
    minseg.manual_seed(0)
    with minseg.backend.using("numpy"):
        model = UNet(in_channels=3, num_classes=4, base_channels=4, depth=2)
        x = tensor(np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
        t = tensor(np.random.default_rng(1).integers(0, 4, (2, 16, 16)))
        for _ in range(2):
            model.zero_grad()
            F.cross_entropy(model(x), t).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert copied == []
