"""kernels/softmax_cross_entropy/fastmath.py: the bit-level exp and log against NumPy, whole arrays.

The exact value is NumPy's exp/log in long double (64-bit mantissa on x86-64:
11 more bits than float64), and the error is measured in units in the last
place (ulp) of the result's dtype. Each tolerance is the maximum error measured
on these very inputs (deterministic: a dense grid over the whole valid range
plus the edge values), rounded up to the next tenth of an ulp, so a change
that makes either function less accurate anywhere in its range fails here.
"""
import numpy as np
import pytest
from numba import njit

from kernels.softmax_cross_entropy.fastmath import exp_shifted, log_inplace


@njit
def _exp(x, shift, out):
    exp_shifted(x, shift, out)


@njit
def _log(a):
    log_inplace(a)


def _ulp_error(got, exact, dtype):
    """|got - exact| in units of the last place of exact rounded to ``dtype``."""
    exact_rounded = np.abs(exact).astype(dtype)
    return np.abs(got.astype(np.longdouble) - exact) / np.spacing(exact_rounded).astype(np.longdouble)


# dtype: (smallest argument with a normal result, largest valid argument, measured max ulp of exp, of log)
LIMITS = {np.float32: (-87.33, 88.0, 0.6, 2.1), np.float64: (-708.39, 709.0, 2.2, 1.8)}


def _exp_arguments(dtype):
    lo, hi = LIMITS[dtype][:2]
    k = np.arange(-120, 120)
    edges = np.concatenate([[0.0, -0.0, 1e-30, -1e-30, np.log(2.0) / 2, -np.log(2.0) / 2], k * np.log(2.0), k * np.log(2.0) + 1e-7])
    grid = np.linspace(lo, hi, 200_001)
    x = np.concatenate([grid, edges[(edges >= lo) & (edges <= hi)]]).astype(dtype)
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_matches_numpy_over_the_whole_range(dtype):
    x = _exp_arguments(dtype)
    rng = np.random.default_rng(0)
    shift = rng.uniform(-50, 50, x.size).astype(dtype)
    shift[::2] = 0  # half the arguments unshifted: the grid itself, edges included
    out = np.empty_like(x)
    _exp(x + shift, shift, out)
    z = (x + shift) - shift  # the argument the function sees, rounded as it rounds it
    lo, hi, max_ulp, _ = LIMITS[dtype]
    keep = (z >= lo) & (z <= hi)
    err = _ulp_error(out[keep], np.exp(z[keep].astype(np.longdouble)), dtype)
    assert err.max() <= max_ulp, f"max error {float(err.max()):.3f} ulp at z = {z[keep][np.argmax(err)]!r}"
    zeros = np.array([0.0, -0.0], dtype)
    ones = np.empty_like(zeros)
    _exp(zeros, np.zeros_like(zeros), ones)
    assert ones.tolist() == [1.0, 1.0], "exp(0) and exp(-0) are exactly 1"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_below_the_normal_range_and_special_values(dtype):
    tiny = np.finfo(dtype).tiny
    x = np.array([LIMITS[dtype][0] - 0.5, LIMITS[dtype][0] - 10, -1e30, -np.inf, np.nan], dtype)
    out = np.empty_like(x)
    _exp(x, np.zeros_like(x), out)
    assert ((out[:4] >= 0) & (out[:4] <= tiny)).all(), "results below the normal range are 0 or the smallest normal"
    assert out[3] == 0 and np.isnan(out[4]), "exp(-inf) = 0 and exp(NaN) = NaN"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_matches_numpy_over_every_positive_normal(dtype):
    info = np.finfo(dtype)
    # every binade from the smallest normal to the largest finite value, 500 mantissas each
    exponents = np.arange(info.minexp, info.maxexp)
    mantissas = np.linspace(1.0, 2.0, 500, endpoint=False)
    a = np.ldexp(mantissas[None, :], exponents[:, None]).reshape(-1)
    edges = np.array([1.0, 2.0, 0.5, np.sqrt(2.0), np.sqrt(0.5), np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0)])
    a = np.concatenate([a.astype(dtype), edges.astype(dtype), [info.tiny, info.max]]).astype(dtype)
    got = a.copy()
    _log(got)
    exact = np.log(a.astype(np.longdouble))
    nonzero = exact != 0
    err = _ulp_error(got[nonzero], exact[nonzero], dtype)
    assert err.max() <= LIMITS[dtype][3], f"max error {float(err.max()):.3f} ulp at a = {a[nonzero][np.argmax(err)]!r}"
    assert got[~nonzero].tolist() == [0.0] * int((~nonzero).sum()), "log(1) is exactly 0"
