"""accumulate's CUDA kernel against the NumPy reference across blocks, under the simulator when there is no GPU.

The kernel is a grid-stride loop over a grid capped at ``MAX_BLOCKS`` blocks. Here an
array of several 256-thread blocks with a partial last one, and the same with the cap
lowered to 2 blocks so every thread strides over more than one element. Every element
of ``part`` is a nonzero normal draw, so an element a thread skips keeps its old value
and fails the bit-for-bit comparison.
"""
import numpy as np
import pytest

from kernels.accumulate import cuda as K
from tests.kernels.test_accumulate import check_against_reference


@pytest.mark.parametrize("max_blocks", [K.MAX_BLOCKS, 2], ids=["one-element-per-thread", "grid-stride"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulate_kernel_covers_every_element(monkeypatch, max_blocks, dtype):
    monkeypatch.setattr(K, "MAX_BLOCKS", max_blocks)
    size = 3 * K.THREADS + 5  # 4 blocks, the last one with 5 threads at work; 2 strides at 2 blocks
    check_against_reference("kernels.accumulate.cuda", (size,), dtype, 0.0, seed=0)
