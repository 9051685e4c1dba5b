"""kernels/memory.py: cache-line-aligned outputs (conv2d v5's grad_weight reads gy a 64-byte vector at a time)."""
import numpy as np
import pytest

from kernels.memory import CACHE_LINE, empty_aligned


@pytest.mark.parametrize("shape", [(8, 16, 64, 64), (3, 5, 7), (1,), (), (0, 4), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
def test_empty_aligned_is_an_ordinary_array_starting_on_a_cache_line(shape, dtype):
    a = empty_aligned(shape, dtype)
    assert a.shape == shape and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
    assert a.ctypes.data % CACHE_LINE == 0 or a.size == 0  # an empty array has no first value to place
    a[...] = 7  # every value is its own memory: writing all of them reads back the same
    assert (a == 7).all() and a.nbytes == int(np.prod(shape)) * np.dtype(dtype).itemsize


def test_outputs_feeding_conv_grad_weight_are_aligned():
    """The batch-norm backward's gx (conv2d's gy in Conv -> BN blocks) and conv2d's output start on cache lines."""
    from kernels.batch_norm import cpu as bn
    from kernels.conv2d import cpu as conv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 6, 16)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    y = conv.conv2d_forward(x, w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert y.ctypes.data % CACHE_LINE == 0
    mean, var = bn.batch_norm_stats(y)
    out, xhat, invstd = bn.batch_norm_forward(y, mean, var, None, None, 1e-5)
    gx, _, _ = bn.batch_norm_backward(np.ones_like(out), xhat, invstd, None, True)
    assert gx.ctypes.data % CACHE_LINE == 0
