"""avg_pool2d's CUDA kernels under the simulator: launches of several blocks with a partial last one,
and every output element written (outputs are NaN-poisoned by ``cuda_common.empty``, so an element
a thread skips, e.g. a pixel no window holds, shows up as NaN instead of a lucky 0).
The per-backend property tests against the reference are in tests/kernels/test_avg_pool2d.py."""
import numpy as np

from kernels.avg_pool2d import cuda as K
from tests.helpers import assert_close, reference, tol

R = reference("avg_pool2d")


def test_several_blocks_and_pixels_no_window_reads():
    """3*4*9*11 = 1188 input threads (10 blocks of 128, the last partial); stride 3 > kernel 2
    leaves rows and columns that no window reads: their gradient is exactly 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 9, 11)).astype(np.float32)
    args = ((2, 2), (3, 3), (0, 1), True, False, None)
    y = K.avg_pool2d_forward(x, *args)
    assert_close(y, R.avg_pool2d_forward(x, *args), *tol(np.float32), name="y")
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = K.avg_pool2d_backward(gy, x.shape, *args)
    assert_close(gx, R.avg_pool2d_backward(gy, x.shape, *args), *tol(np.float32), name="gx")
    assert (gx[:, :, 2::3] == 0).all()  # rows 2, 5, 8: between windows [0, 2), [3, 5), [6, 8)


def test_adaptive_upsampling_repeats_inputs_across_blocks():
    """Output 13x17 from 4x5: every input feeds several outputs; 2*2*13*17 = 884 forward threads."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 4, 5))
    y = K.adaptive_avg_pool2d_forward(x, (13, 17))
    assert_close(y, R.adaptive_avg_pool2d_forward(x, (13, 17)), *tol(np.float64), name="y")
    gy = rng.standard_normal(y.shape)
    assert_close(K.adaptive_avg_pool2d_backward(gy, x.shape), R.adaptive_avg_pool2d_backward(gy, x.shape), *tol(np.float64))
