"""sgd's CUDA kernel against the NumPy reference across blocks, under the simulator when there is no GPU.

The kernel is a grid-stride loop over a grid capped at ``MAX_BLOCKS`` blocks. Here a
parameter of several 256-thread blocks with a partial last one, and the same with the
cap lowered to 2 blocks so every thread strides over more than one element. The buffer
starts as NaN and the parameter moves on every element (lr > 0, no zero gradient), so
an element a thread skips fails the comparison.
"""
import numpy as np
import pytest

from kernels.sgd import cuda as K
from tests.kernels.test_sgd import check_against_reference

OPTIONS = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True)


@pytest.mark.parametrize("max_blocks", [K.MAX_BLOCKS, 2], ids=["one-element-per-thread", "grid-stride"])
def test_sgd_kernel_covers_every_element(monkeypatch, max_blocks):
    monkeypatch.setattr(K, "MAX_BLOCKS", max_blocks)
    size = 3 * K.THREADS + 5  # 4 blocks, the last one with 5 threads at work; 2 strides at 2 blocks
    check_against_reference("kernels.sgd.cuda", (size,), np.float32, OPTIONS, 2, False, seed=0)
