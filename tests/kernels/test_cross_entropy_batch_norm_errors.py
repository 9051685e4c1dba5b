"""Bad arguments to softmax, log_softmax, cross_entropy and batch_norm fail early with an
error that names the argument (and the expected and actual value)."""
import numpy as np
import pytest

import minseg
from minseg.functional import batch_norm, batch_norm_relu, cross_entropy, log_softmax, softmax

LOGITS = minseg.Tensor(np.zeros((2, 3, 4, 5), np.float32))
TARGET = minseg.Tensor(np.zeros((2, 4, 5), np.int64))


@pytest.mark.parametrize("op", [softmax, log_softmax])
@pytest.mark.parametrize("dim, match", [(4, "dim 4 is out of range for a 4-D input"), (-5, "dim -5 is out of range"),
                                        (None, "dim must be an int"), (1.0, "dim must be an int")])
def test_softmax_rejects_bad_dim(op, dim, match):
    with pytest.raises(ValueError, match=f"{op.__name__}: {match}"):
        op(LOGITS, dim)


def test_softmax_rejects_integer_input():
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        softmax(minseg.Tensor(np.zeros((2, 3), np.int64)), 1)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((LOGITS, minseg.Tensor(np.zeros((2, 4, 4), np.int64))), {}, ValueError,
         r"target must have shape \(2, 4, 5\) for input of shape \(2, 3, 4, 5\), got \(2, 4, 4\)"),
        ((LOGITS, minseg.Tensor(np.zeros((2, 20), np.int64))), {}, ValueError, r"target must have shape \(2, 4, 5\)"),
        ((LOGITS, minseg.Tensor(np.full((2, 4, 5), 3))), {}, ValueError,
         r"target value 3 is out of range: expected class indices in \[0, 2\] or ignore_index=-100"),
        ((LOGITS, minseg.Tensor(np.full((2, 4, 5), -1))), {}, ValueError, "target value -1 is out of range"),
        ((LOGITS, minseg.Tensor(np.full((2, 4, 5), 255))), {"ignore_index": 254}, ValueError,
         "target value 255 is out of range.*ignore_index=254"),
        ((LOGITS, minseg.Tensor(np.zeros((2, 4, 5), np.float32))), {}, TypeError, "target must hold integer class indices"),
        ((LOGITS, np.zeros((2, 4, 5), np.int64)), {}, TypeError, "target must be a minseg Tensor"),
        ((LOGITS, TARGET), {"weight": minseg.Tensor(np.ones(4, np.float32))}, ValueError,
         r"weight must have shape \(3,\), one per class, got \(4,\)"),
        ((LOGITS, TARGET), {"weight": minseg.Tensor(np.ones(3, np.float64))}, TypeError,
         "weight has dtype float64 but input has dtype float32"),
        ((LOGITS, TARGET), {"reduction": "avg"}, ValueError, r"reduction must be one of \('none', 'mean', 'sum'\), got 'avg'"),
        ((LOGITS, TARGET), {"reduction": None}, ValueError, "reduction must be one of"),
        ((LOGITS, TARGET), {"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        ((LOGITS, TARGET), {"label_smoothing": -0.1}, ValueError, "label_smoothing must be in"),
        ((LOGITS, TARGET), {"label_smoothing": float("nan")}, ValueError, "label_smoothing must be in"),
        ((LOGITS, TARGET), {"label_smoothing": "0.1"}, ValueError, "label_smoothing must be in"),
        ((minseg.Tensor(np.zeros(3, np.float32)), minseg.Tensor(np.zeros((), np.int64))), {}, ValueError,
         r"input must be \(N, C\) or \(N, C, H, W\) logits, got shape \(3,\)"),
        ((minseg.Tensor(np.zeros((2, 3), np.int64)), minseg.Tensor(np.zeros(2, np.int64))), {}, TypeError,
         "input must be float32 or float64"),
    ],
)
def test_cross_entropy_rejects(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_entropy(*args, **kwargs)


def test_cross_entropy_accepts_ignore_index_targets_outside_the_classes():
    target = np.zeros((2, 4, 5), np.int64)
    target[0, 0, 0] = 255
    loss = cross_entropy(LOGITS, minseg.Tensor(target), ignore_index=255)
    assert np.isclose(loss.item(), np.log(3))  # uniform logits: -log(1/3) on every counted pixel


X = minseg.Tensor(np.zeros((2, 3, 4, 4), np.float32))
C3 = minseg.Tensor(np.ones(3, np.float32))
C4 = minseg.Tensor(np.ones(4, np.float32))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((X, C4, C3), {}, ValueError, r"running_mean must have shape \(3,\) for input with 3 channels, got \(4,\)"),
        ((X, C3, C4), {}, ValueError, r"running_var must have shape \(3,\) for input with 3 channels, got \(4,\)"),
        ((X, C3, C3), {"weight": C4}, ValueError, r"weight must have shape \(3,\)"),
        ((X, C3, C3), {"bias": C4}, ValueError, r"bias must have shape \(3,\)"),
        ((X, None, None), {"weight": C4, "training": True}, ValueError, r"weight must have shape \(3,\)"),
        ((X, C3, C3), {"weight": minseg.Tensor(np.ones(3))}, TypeError, "weight has dtype float64 but input has dtype float32"),
        ((X, None, None), {"training": False}, ValueError, "eval mode .* needs running_mean and running_var"),
        ((X, C3, C3), {"eps": 0.0}, ValueError, "eps must be a positive number"),
        ((minseg.Tensor(np.zeros((1, 3), np.float32)), None, None), {"training": True}, ValueError,
         r"training mode needs more than 1 value per channel, got input shape \(1, 3\)"),
        ((minseg.Tensor(np.zeros((1, 3, 1, 1), np.float32)), C3, C3), {"training": True}, ValueError,
         "more than 1 value per channel"),
        ((minseg.Tensor(np.zeros(3, np.float32)), C3, C3), {}, ValueError, r"input must be \(N, C, ...\)"),
    ],
)
@pytest.mark.parametrize("function", [batch_norm, batch_norm_relu])
def test_batch_norm_rejects(function, args, kwargs, error, match):
    running = [None if a is None else minseg.Tensor(a.numpy().copy()) for a in args[1:]]
    with pytest.raises(error, match=match):
        function(args[0], *running, **kwargs)
    for before, after in zip(args[1:], running):  # a rejected call must not touch the running statistics
        if before is not None:
            np.testing.assert_array_equal(after.numpy(), before.numpy())


@pytest.mark.parametrize("backend_name", ["numpy", "cpu"])
def test_cross_entropy_asks_for_the_gradient_only_when_one_is_wanted(backend_name, monkeypatch):
    """Inference (no_grad, or logits that need no gradient) must not pay for the (N, C, S) gradient buffer."""
    from minseg import backend

    kernels = backend.load(backend_name)
    forward = kernels.functions["cross_entropy_forward"]
    asked = []

    def spy(*args):
        asked.append(args[-1])
        return forward(*args)

    monkeypatch.setitem(kernels.functions, "cross_entropy_forward", spy)
    target = minseg.Tensor(np.zeros((2, 4, 5), np.int64))
    x = minseg.Tensor(np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32), requires_grad=True)
    with backend.using(backend_name):
        cross_entropy(x, target).backward()
        with minseg.no_grad():
            cross_entropy(x, target)
        cross_entropy(minseg.Tensor(x.numpy()), target)
    assert asked == [True, False, False]
    assert x.grad is not None and np.isfinite(x.grad.numpy()).all()
