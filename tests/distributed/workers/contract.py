"""Worker for tests/distributed/test_multirank.py; run as ``mpiexec -n 2 python -m mpi4py contract.py``.

Every rank also computes the single-process reference itself (with a world-of-one
communicator), so one launch checks the contract: 2 ranks x batch B train exactly
as 1 process x batch 2B. An assertion failing on any rank aborts the job (non-zero
exit), which fails the test. Rank 0 prints one line per passed check.
"""

import sys

import numpy as np

from minseg import backend, distributed, nn, optim, tensor
from minseg.cli import evaluate
from minseg.data import DataLoader, Subset
from minseg.rng import manual_seed

backend.set_backend(sys.argv[1] if len(sys.argv) > 1 else "numpy")
world = distributed.init()
local = distributed.LocalCommunicator()
W, R = world.size, world.rank
assert W == 2, f"run me on 2 ranks, got {W}"

# float64 everywhere: what differs between the two runs is only the order of float
# sums (~1e-16 relative per operation), so 1e-6 (the bound) holds with a wide
# margin, while a wrong normalisation or local batch norm is off by ~1e-2.
TOL = 1e-6
N, B, S, C = 8, 2, 12, 3  # images, per-rank batch, image size, classes
EPOCHS = 2  # 2 epochs x N / (W B) = 4 steps


def say(*args):
    if R == 0:
        print(*args, flush=True)


class Arrays:
    """A dataset of fixed arrays (the DataLoader only needs these attributes)."""

    classes, num_classes, in_channels, uniform_size = ("a", "b", "c"), C, 3, True

    def __init__(self, images, masks):
        self.images, self.masks = images, masks

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]


rng = np.random.default_rng(0)  # the same data on every rank
images = rng.standard_normal((N, 3, S, S)).astype(np.float32)
masks = rng.integers(0, C, (N, S, S))
# Uneven ignored pixels (none .. 90%), so each rank's shard has its own count of valid
# pixels: dividing by the local count instead of the global one would change the gradient.
for i, frac in enumerate(np.linspace(0.0, 0.9, N)):
    masks[i][rng.random((S, S)) < frac] = 255
data = Arrays(images, masks)


def make_model(seed, sync_bn):
    manual_seed(seed)
    model = nn.build_model("unet", in_channels=3, num_classes=C, base_channels=4, depth=1).astype(np.float64)
    return distributed.convert_sync_batchnorm(model) if sync_bn else model


def make_optimizer(name, params):
    if name == "sgd":
        return optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    return optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def train(model, loader, opt, comm):
    model.train()
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for x, y in loader:
            valid = distributed.count_valid(y, 255, comm)
            loss = distributed.cross_entropy(model(tensor(x.astype(np.float64))), tensor(y), 255, valid, comm)
            opt.zero_grad()
            loss.backward()
            opt.step()


def state(model):
    return np.concatenate([v.astype(np.float64).ravel() for v in model.state_dict().values()])


def flat_parameters(model):
    return np.concatenate([p.numpy().ravel() for p in model.parameters()])


def run(opt_name, sync_bn, bucket_bytes):
    """(max |distributed - single| over parameters and buffers, the distributed model)."""
    ref = make_model(0, sync_bn=False)
    ref_loader = DataLoader(data, W * B, shuffle=True, seed=3)
    train(ref, ref_loader, make_optimizer(opt_name, ref.parameters()), local)

    model = make_model(R, sync_bn)  # rank 1 starts from other weights: broadcast must fix that
    distributed.broadcast_parameters(model, comm=world)
    sampler = distributed.DistributedSampler(data, seed=3, num_replicas=W, rank=R)
    loader = DataLoader(data, B, seed=3, sampler=sampler)
    opt = distributed.DistributedOptimizer(make_optimizer(opt_name, model.parameters()), world, bucket_bytes)
    train(model, loader, opt, world)

    # Same averaged gradients, same updates: the replicas' weights are bitwise equal (with
    # synchronised batch norm their running statistics too; local ones differ by design).
    mine = state(model) if sync_bn else flat_parameters(model)
    assert np.array_equal(mine, world.broadcast_(mine.copy(), 0)), "the replicas differ after training"
    return float(np.abs(state(model) - state(ref)).max()), model


for opt_name, bucket_bytes in (("sgd", 2048), ("adamw", distributed.BUCKET_BYTES)):
    err, model = run(opt_name, sync_bn=True, bucket_bytes=bucket_bytes)
    assert err <= TOL, f"{opt_name}: 2 ranks x {B} differ from 1 process x {W * B} by {err:.3g}"
    buckets = len(distributed.plan_buckets([(p.shape, p.dtype) for p in model.parameters()], bucket_bytes))
    say(f"contract {opt_name} sync-bn buckets={buckets} max-diff={err:.3g} ok")
    err_local, _ = run(opt_name, sync_bn=False, bucket_bytes=bucket_bytes)
    # Local batch norm normalises each rank's 2 images by their own statistics: another function.
    assert err_local > 1e3 * TOL, f"{opt_name}: local batch norm matched the single process ({err_local:.3g}): the test cannot fail"
    say(f"contract {opt_name} local-bn max-diff={err_local:.3g} differs ok")

# Sharded evaluation: the same (trained, identical) model over 2 ranks and over one process.
# 7 images: shards of 3 and 4, nothing padded.
model.astype(np.float32)
val = Subset(data, range(7))
s_world, loss_world, _ = evaluate(model, val, C, batch_size=3, comm=world)
s_local, loss_local, _ = evaluate(model, val, C, batch_size=3, comm=local)
assert s_world["mIoU"] == s_local["mIoU"] and s_world["aAcc"] == s_local["aAcc"], (s_world, s_local)
assert abs(loss_world - loss_local) <= 1e-6 * abs(loss_local), (loss_world, loss_local)  # float32 sums, other order
say(f"evaluate sharded mIoU={s_world['mIoU']:.6f} loss={loss_world:.6f} ok")

# SyncBatchNorm2d on each rank's part vs BatchNorm2d on the concatenated batch.
# Unequal parts (1 and 3 images) check that the count is summed, not assumed equal.
x = rng.standard_normal((4, 5, 3, 4)) * 2 + 3
g = rng.standard_normal(x.shape)
w, b = rng.standard_normal(5), rng.standard_normal(5)
part = slice(0, 1) if R == 0 else slice(1, 4)
bn, sbn = nn.BatchNorm2d(5).astype(np.float64), distributed.SyncBatchNorm2d(5, comm=world).astype(np.float64)
for layer in (bn, sbn):
    layer.weight.data[:], layer.bias.data[:] = w, b
x_full, x_part = tensor(x, requires_grad=True), tensor(x[part].copy(), requires_grad=True)
y_full, y_part = bn(x_full), sbn(x_part)
(y_full * tensor(g)).sum().backward()
(y_part * tensor(g[part].copy())).sum().backward()
np.testing.assert_allclose(y_part.numpy(), y_full.numpy()[part], rtol=1e-12, atol=1e-12)
np.testing.assert_allclose(x_part.grad.numpy(), x_full.grad.numpy()[part], rtol=1e-10, atol=1e-12)
for name in ("weight", "bias"):  # each rank's own share; their sum is the full batch's gradient
    summed = world.allreduce_(getattr(sbn, name).grad.numpy().copy())
    np.testing.assert_allclose(summed, getattr(bn, name).grad.numpy(), rtol=1e-12, atol=1e-12)
for name in ("running_mean", "running_var"):
    mine = getattr(sbn, name).numpy()
    np.testing.assert_allclose(mine, getattr(bn, name).numpy(), rtol=1e-12, atol=1e-12)
    assert np.array_equal(mine, world.broadcast_(mine.copy(), 0)), f"{name} differs between ranks"
say("sync-batch-norm vs batch-norm on the concatenated batch ok")
