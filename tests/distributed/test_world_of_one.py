"""minseg.distributed in one process: the world of one, the pieces that need no second rank,
and the collective-selection logic (including NCCL's, with a stand-in for CuPy's NCCL module).
"""
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minseg import backend, distributed, nn, optim, tensor
from minseg import functional as F
from minseg.distributed.comm import _check_array
from tests.distributed.mpi import ROOT, explain, rank_env
from tests.helpers import assert_close


def test_a_plain_run_is_a_world_of_one_without_importing_mpi(tmp_path):
    """init() and a whole `minseg train` run without mpiexec never import mpi4py."""
    code = (
        "import sys\n"
        "from minseg import distributed\n"
        "from minseg.cli import main\n"
        "w = distributed.init()\n"
        "assert (w.size, w.rank, distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, 1, 0, True)\n"
        "distributed.barrier()\n"
        f"assert main(['train', '--backend', 'numpy', '--epochs', '1', '--num-images', '2', '--val-images', '2', '--size', '8', "
        f"'--base-channels', '2', '--depth', '1', '--batch-size', '2', '--quiet', '--out', {str(tmp_path)!r}]) == 0\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n"
        "print('world of one ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "world of one ok" in proc.stdout, explain(proc)
    assert "data-parallel" not in proc.stdout
    assert (tmp_path / "last.npz").is_file()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, (1, 4)),  # MPICH / Intel MPI (Hydra)
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, (0, 2)),  # Open MPI
    ({"PMI_RANK": "1"}, None),  # half a pair is not a launch
])
def test_launch_detection(env, expected):
    assert distributed.launched_by_mpi(env) == expected


@pytest.mark.parametrize("requested, backend_name, status, world, expected", [
    ("auto", "cpu", "not used", 4, "host"),
    ("auto", "cuda", "simulator", 4, "host"),  # simulator arrays live on the host
    ("auto", "cuda", "gpu", 1, "host"),  # nothing to reduce
    ("host", "cuda", "gpu", 4, "host"),
])
def test_collectives_choice(requested, backend_name, status, world, expected):
    assert distributed.choose_collectives(requested, backend_name, status, world) == expected


def test_collectives_choice_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"collectives must be one of \['auto', 'host', 'nccl'\], got 'gloo'"):
        distributed.choose_collectives("gloo", "cpu", "not used", 2)
    with pytest.raises(ValueError, match="collectives='nccl' sums GPU arrays, but the active backend is 'cpu'"):
        distributed.choose_collectives("nccl", "cpu", "not used", 2)
    with pytest.raises(RuntimeError, match="collectives='nccl' needs a real GPU, but CUDA is: simulator"):
        distributed.choose_collectives("nccl", "cuda", "simulator", 2)
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed
    with pytest.raises(RuntimeError, match=r"NCCL collectives need CuPy with NCCL: pip install 'minseg\[gpu\]'"):
        distributed.choose_collectives("nccl", "cuda", "gpu", 2)
    assert distributed.choose_collectives("auto", "cuda", "gpu", 2) == "host"  # auto falls back to host staging


def _fake_cupy(monkeypatch, nccl_available=True):
    """Stand-ins for cupy and cupy.cuda.nccl that record what NCCLCommunicator asks of them."""
    calls = []
    nccl = types.SimpleNamespace(
        available=nccl_available, NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_INT64=4, NCCL_INT32=2, NCCL_SUM=0,
        get_unique_id=lambda: ("uid",),
        NcclCommunicator=lambda size, uid, rank: types.SimpleNamespace(
            allReduce=lambda *a: calls.append(("allReduce", a)), bcast=lambda *a: calls.append(("bcast", a)),
            init=(size, uid, rank)),
    )
    cuda = types.SimpleNamespace(
        nccl=nccl, Device=lambda i: types.SimpleNamespace(use=lambda: calls.append(("device", i))),
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 2),
        get_current_stream=lambda: types.SimpleNamespace(ptr=99),
    )
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    return calls


class _GPUArray:
    """Just what NCCLCommunicator reads of a CuPy array: flags, dtype, size, shape, data.ptr."""

    def __init__(self, a):
        self.a, self.dtype, self.size, self.shape, self.flags = a, a.dtype, a.size, a.shape, a.flags
        self.data = types.SimpleNamespace(ptr=a.ctypes.data)


def test_nccl_communicator_uses_rank0s_unique_id_and_reduces_on_the_current_stream(monkeypatch):
    calls = _fake_cupy(monkeypatch)
    host = distributed.LocalCommunicator()
    comm = distributed.NCCLCommunicator(host)
    assert comm.comm.init == (1, ("uid",), 0)  # world of one: the id rank 0 made
    assert ("device", 0) in calls  # GPU chosen by local rank
    a = _GPUArray(np.zeros(5, np.float32))
    comm.allreduce_(a)
    assert calls[-1] == ("allReduce", (a.data.ptr, a.data.ptr, 5, 7, 0, 99))  # in place, float32, sum, current stream
    comm.broadcast_(_GPUArray(np.zeros(3, np.float64)), root=0)
    assert calls[-1][0] == "bcast" and calls[-1][1][1:] == (3, 8, 0, 99)
    with pytest.raises(TypeError, match="NCCL collectives take .* arrays, got int8"):
        comm.allreduce_(_GPUArray(np.zeros(3, np.int8)))
    host_array = np.ones(2)
    assert comm.allreduce_(host_array) is host_array  # host arrays go over the host communicator


def test_nccl_absent_from_cupy_is_a_clear_error(monkeypatch):
    _fake_cupy(monkeypatch, nccl_available=False)
    with pytest.raises(RuntimeError, match="this CuPy was built without NCCL"):
        distributed.NCCLCommunicator(distributed.LocalCommunicator())


def test_collectives_need_contiguous_arrays():
    with pytest.raises(ValueError, match=r"allreduce_ works in place and needs a C-contiguous array, got shape \(3,\)"):
        _check_array(np.zeros(6)[::2], "allreduce_")


@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12), bucket=st.integers(8, 2000),
       dtypes=st.lists(st.sampled_from([np.float32, np.float64]), min_size=12, max_size=12))
@example(sizes=[1000, 1, 1], bucket=8, dtypes=[np.float32] * 12)  # a parameter larger than a bucket
def test_bucket_plan(sizes, bucket, dtypes):
    params = [((n,), np.dtype(dtypes[i])) for i, n in enumerate(sizes)]
    buckets = distributed.plan_buckets(params, bucket)
    assert [i for b in buckets for i in b] == list(reversed(range(len(params))))  # reverse order, each once
    for b in buckets:
        assert len({params[i][1] for i in b}) == 1  # one dtype per flat buffer
        nbytes = sum(params[i][0][0] * params[i][1].itemsize for i in b)
        assert nbytes <= bucket or len(b) == 1
    for b, nxt in zip(buckets, buckets[1:]):  # a bucket closes only when the next parameter does not fit
        first = nxt[0]
        fits = sum(params[i][0][0] * params[i][1].itemsize for i in b) + params[first][0][0] * params[first][1].itemsize <= bucket
        assert not fits or params[first][1] != params[b[0]][1]


class _OtherRankAddsOnes:
    """A 2-rank world seen from one rank: the other rank's gradient is all ones."""

    size, rank = 2, 0

    def __init__(self):
        self.reduced = []

    def allreduce_(self, a):
        self.reduced.append(a.size)
        a += 1
        return a


def test_reducer_averages_every_gradient_through_the_buckets():
    rng = np.random.default_rng(0)
    params = [nn.Parameter(rng.standard_normal(s)) for s in [(3, 2), (5,), (4, 4), (1,)]]
    grads = [rng.standard_normal(p.shape) for p in params]
    for p, g in zip(params[:-1], grads):
        p.grad = tensor(g.copy())
    comm = _OtherRankAddsOnes()
    reducer = distributed.GradientReducer(params, comm, bucket_bytes=8 * 16)
    reducer.reduce()
    # Reverse order in 128-byte buckets of float64: (1,) alone, as adding (4, 4) would make 136 bytes;
    # (4, 4) fills one exactly; (5,) and (3, 2) share the last.
    assert comm.reduced == [1, 16, 5 + 6]
    for p, g in zip(params[:-1], grads):
        assert_close(p.grad.numpy(), (g + 1) / 2, rtol=0, atol=1e-15)
    assert_close(params[-1].grad.numpy(), np.full(1, 0.5), rtol=0, atol=0)  # no gradient here counts as zeros


def test_distributed_optimizer_reduces_then_steps_and_delegates_the_rest():
    p = nn.Parameter(np.ones(3))
    p.grad = tensor(np.full(3, 2.0))
    comm = _OtherRankAddsOnes()
    opt = distributed.DistributedOptimizer(optim.SGD([p], lr=0.5), comm)
    schedule = optim.CosineLR(opt.optimizer, total_steps=10)
    opt.step()
    assert_close(p.numpy(), np.full(3, 1 - 0.5 * 1.5), rtol=0, atol=0)  # averaged gradient (2 + 1) / 2
    opt.lr = 0.1
    assert opt.optimizer.lr == 0.1 and opt.lr == 0.1
    schedule.step()
    assert opt.lr == opt.optimizer.lr and opt.state_dict()["steps"] == 1
    opt.zero_grad()
    assert p.grad is None


def test_world_of_one_loss_and_collectives_are_the_identity():
    rng = np.random.default_rng(1)
    logits = tensor(rng.standard_normal((2, 3, 4, 4)))
    target = rng.integers(0, 3, (2, 4, 4))
    target[0, :2] = 255
    assert distributed.count_valid(target, 255) == int((target != 255).sum())
    assert_close(distributed.cross_entropy(logits, tensor(target), 255).numpy(),
                 F.cross_entropy(logits, tensor(target), ignore_index=255).numpy(), rtol=0, atol=0)
    model = nn.build_model("fcn", in_channels=3, num_classes=2, base_channels=2, depth=1)
    before = model.state_dict()
    distributed.broadcast_parameters(model)
    for k, v in model.state_dict().items():
        assert np.array_equal(v, before[k])


def _bn_pair(c, dtype, rng):
    bn, sync = nn.BatchNorm2d(c).astype(dtype), distributed.SyncBatchNorm2d(c).astype(dtype)
    for name in ("weight", "bias"):
        v = rng.standard_normal(c).astype(dtype)
        getattr(bn, name).data[:] = v
        getattr(sync, name).data[:] = v
    return bn, sync


@pytest.mark.parametrize("backend_name", ["numpy", "cpu", "cuda"])  # cuda: the simulator without a GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sync_batch_norm_at_world_one_is_batch_norm(backend_name, dtype):
    """Forward, backward (input, weight, bias) and running statistics, two training steps then eval.

    Both layers compute the same formula with float64 statistics; float32 outputs can
    differ by the rounding of the two summation orders (a few ulp: rtol 1e-5)."""
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(2)
    with backend.using(backend_name):
        bn, sync = _bn_pair(3, dtype, rng)
        for _ in range(2):
            x = (rng.standard_normal((2, 3, 5, 4)) * 4 + 10).astype(dtype)  # |mean| >> std: the two-pass variance matters
            g = rng.standard_normal(x.shape).astype(dtype)
            outs = []
            for layer in (bn, sync):
                layer.zero_grad()
                xt = tensor(x, requires_grad=True)
                y = layer(xt)
                (y * tensor(g)).sum().backward()
                outs.append((y.numpy(), xt.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy()))
            for a, b in zip(*outs):
                assert_close(b, a, **tol)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close(getattr(sync, name).numpy(), getattr(bn, name).numpy(), **tol)
        bn.eval(), sync.eval()
        x = tensor(rng.standard_normal((1, 3, 2, 2)).astype(dtype))
        assert_close(sync(x).numpy(), bn(x).numpy(), **tol)  # running statistics may differ by rounding


def test_sync_batch_norm_bad_input():
    sync = distributed.SyncBatchNorm2d(3)
    with pytest.raises(ValueError, match=r"SyncBatchNorm2d expects \(N, C, H, W\) input, got shape \(2, 3\)"):
        sync(tensor(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="needs more than 1 value per channel over all ranks, got 1"):
        sync(tensor(np.zeros((1, 3, 1, 1), np.float32)))
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        sync(tensor(np.zeros((2, 3, 2, 2), np.int64)))
    with pytest.raises(TypeError, match="running_mean has dtype float32 but input has dtype float64"):
        sync(tensor(np.zeros((2, 3, 2, 2), np.float64)))
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\], got None"):
        distributed.SyncBatchNorm2d(3, momentum=None)(tensor(np.zeros((2, 3, 2, 2), np.float32)))


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_names():
    model = nn.build_model("unet", in_channels=3, num_classes=2, base_channels=2, depth=1)
    params, state = model.parameters(), model.state_dict()
    opt = optim.SGD(params, lr=0.1)
    converted = distributed.convert_sync_batchnorm(model)
    assert converted is model
    kinds = [type(m) for m in model.modules()]
    assert nn.BatchNorm2d in {k.__mro__[1] for k in kinds} and nn.BatchNorm2d not in kinds  # all replaced
    assert sum(k is distributed.SyncBatchNorm2d for k in kinds) == sum(1 for k in state if k.endswith("running_mean"))
    assert all(a is b for a, b in zip(model.parameters(), opt.params))  # the optimizer's parameters, not copies
    assert list(model.state_dict()) == list(state)
    assert isinstance(distributed.convert_sync_batchnorm(nn.BatchNorm2d(2)), distributed.SyncBatchNorm2d)


def test_share_cores_gives_each_rank_on_a_machine_its_share(monkeypatch):
    import os

    import numba

    from minseg.distributed import comm as comm_module

    calls = []
    monkeypatch.setattr(numba, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(comm_module, "_world", types.SimpleNamespace(size=4, rank=1, local_size=2))  # 2 ranks here
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    distributed.share_cores()
    assert calls == [min(8 // 2, numba.config.NUMBA_NUM_THREADS)]
    calls.clear()
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")  # told otherwise: left alone
    distributed.share_cores()
    assert calls == []
