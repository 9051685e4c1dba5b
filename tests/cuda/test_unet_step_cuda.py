"""A whole U-Net training step on the cuda backend (simulator here) equals the numpy backend.

Forward, cross-entropy, backward and an SGD step of a small U-Net (2 base channels,
depth 1: every kind of layer of a deeper one, at half the simulated launches; 4x4 images,
2x2 at the bottleneck) run once on each backend from the same initial weights. Each
simulated CUDA thread is a Python thread, and most launches scale with pixels x channels:
this size runs the same kernels (the same tile configurations) as 4 channels on 8x8.
float64 makes the comparison sharp: both backends compute the same formulas in a
different order, so they agree to ~1e-12 relative; 1e-9 leaves room for the long
reduction chains through BatchNorm without hiding a wrong element.
"""
import numpy as np

import minseg
import minseg.functional as F
from minseg import backend
from minseg.nn import UNet
from minseg.optim import SGD


def _step(name, state, x, target):
    with backend.using(name):
        minseg.manual_seed(0)
        model = UNet(in_channels=3, num_classes=4, base_channels=2, depth=1).astype(np.float64)
        model.load_state_dict(state)
        model.to_backend(name)
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        logits = model(minseg.tensor(x))
        loss = F.cross_entropy(logits, minseg.tensor(target), ignore_index=255)
        loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        return loss.item(), logits.numpy(), grads, model.state_dict()


def test_unet_training_step_cuda_matches_numpy():
    minseg.manual_seed(0)
    state = UNet(in_channels=3, num_classes=4, base_channels=2, depth=1).astype(np.float64).state_dict()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4, 4))
    target = rng.integers(0, 4, (1, 4, 4))
    target[0, :1, :3] = 255  # some ignored pixels

    loss_np, logits_np, grads_np, after_np = _step("numpy", state, x, target)
    loss_cu, logits_cu, grads_cu, after_cu = _step("cuda", state, x, target)

    rtol, atol = 1e-9, 1e-12
    np.testing.assert_allclose(loss_cu, loss_np, rtol=rtol)
    np.testing.assert_allclose(logits_cu, logits_np, rtol=rtol, atol=atol)
    assert grads_cu.keys() == grads_np.keys()
    for name in grads_np:
        np.testing.assert_allclose(grads_cu[name], grads_np[name], rtol=rtol, atol=atol, err_msg=f"grad of {name}")
    for name in after_np:
        np.testing.assert_allclose(after_cu[name], after_np[name], rtol=rtol, atol=atol, err_msg=f"{name} after SGD")
    # the step did something: weights moved
    assert any(not np.array_equal(after_np[n], state[n]) for n in state)
