"""The NCCL communicator at world 1 on a real GPU (skipped under the simulator and without NCCL).

Run with the GPU command (NUMBA_ENABLE_CUDASIM=0). At world 1 an NCCL all-reduce
and broadcast must leave the array unchanged, and a SyncBatchNorm2d step with NCCL
collectives must equal BatchNorm2d, both on CuPy arrays. The multi-rank contract
itself is tested over MPI in tests/distributed/.
"""
import numpy as np
import pytest

from minseg import backend, distributed, nn, tensor
from minseg.distributed.comm import nccl_module

pytestmark = pytest.mark.skipif(backend.cuda_status() != "gpu", reason=f"needs a real GPU (CUDA: {backend.cuda_status()})")


@pytest.fixture
def nccl_comm():
    try:
        nccl_module()
    except RuntimeError as e:
        pytest.skip(str(e))
    return distributed.NCCLCommunicator(distributed.LocalCommunicator())


def test_nccl_world_of_one_collectives_are_the_identity(nccl_comm):
    import cupy

    for dtype in (np.float32, np.float64, np.int64):
        a = cupy.arange(1 << 18, dtype=dtype)  # 1-2 MiB, a gradient bucket's size
        expected = a.copy()
        assert nccl_comm.allreduce_(a) is a
        nccl_comm.broadcast_(a, root=0)
        cupy.cuda.get_current_stream().synchronize()
        assert bool((a == expected).all()), dtype


def test_sync_batch_norm_with_nccl_equals_batch_norm_on_the_gpu(nccl_comm):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)) * 3 + 5
    g = rng.standard_normal(x.shape)
    with backend.using("cuda"):
        bn = nn.BatchNorm2d(3).astype(np.float64).to_backend("cuda")
        sync = distributed.SyncBatchNorm2d(3, comm=nccl_comm).astype(np.float64).to_backend("cuda")
        results = []
        for layer in (bn, sync):
            xt = tensor(backend.to_backend_array(x, "cuda"), requires_grad=True)
            y = layer(xt)
            (y * tensor(backend.to_backend_array(g, "cuda"))).sum().backward()
            results.append((y.numpy(), xt.grad.numpy(), layer.weight.grad.numpy(), layer.running_var.numpy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)  # float64: the same formula, other sum order
