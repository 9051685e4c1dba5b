"""interpolate on the GPU: Numba CUDA gathers over per-axis tap tables, no atomics.

Read ``reference.py`` first: resizing is ``y[n, c] = A_h @ x[n, c] @ A_w^T`` with one
sparse interpolation matrix per axis, given by its *taps*: destination index d
reads source indices ``idx[d, k]`` with weights ``w[d, k]``, k < K (K = 1 for the
nearest modes, 2 for bilinear). The backward is the adjoint,
``gx[n, c] = A_h^T @ gy[n, c] @ A_w``.

Coordinate maps, computed once per axis. Nearest selection is discontinuous,
so the source indices must be torch's to the bit (float32 products, the
``n_out == n_in`` and ``n_out == 2*n_in`` shortcuts); ``reference.axis_taps``
implements exactly that, and these kernels take its tables instead of
re-deriving the arithmetic on the device: the taps depend only on the axis
(Ho + Wo values), not on (n, c, i, j), so computing them per output element
would repeat the same float work N*C*Wo times per row. The tables are cached
per geometry (on a GPU, their device copies too), so a training loop pays for
them once.

* **forward** -- one thread per output element (n, c, i, j), j fastest:
  ``y = sum_{a, b} w_h[i, a] w_w[j, b] x[n, c, idx_h[i, a], idx_w[j, b]]``.
  Writes are coalesced; neighbouring threads read neighbouring (or equal)
  source columns, so the reads coalesce too.
* **backward** -- a *gather*, one thread per input element (n, c, p, q)::

      gx[p, q] = sum_i sum_j A_h[i, p] A_w[j, q] gy[i, j]

  Row p of ``A_h^T`` is nonzero only for the destinations i whose taps hit p,
  and those form one contiguous range ``[lo_h[p], hi_h[p])``: the tap indices
  are non-decreasing in i (``floor`` of a non-decreasing coordinate; the
  border clamps ``min(., n_in - 1)`` and ``max(., 0)`` keep that), and the
  second bilinear tap is never left of the first (``i1 = min(i0 + 1, n_in-1)
  >= i0``). So ``lo[p]`` = the first i whose *last* tap reaches p and
  ``hi[p]`` = the first i whose *first* tap passes p, found by binary search
  (``searchsorted``) on the monotone tap columns. This handles the clamped
  borders without special cases: at the right border both taps of the last
  destinations are ``n_in - 1`` and they all fall into the last pixel's range;
  a pixel that no destination reads (nearest downsampling) gets an empty range
  and gx = 0. ``A_h[i, p] = sum_k w_h[i, k] [idx_h[i, k] == p]`` is rebuilt from
  the taps (both bilinear taps may hit p). Each thread writes only its own
  element, so there are no atomic adds and the sum order is fixed. A scatter
  (each output adding into its 4 sources) would need atomics wherever two
  outputs share a source, i.e. always when upsampling.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from kernels import cuda_common as cc

from .reference import axis_taps

__all__ = ["interpolate_forward", "interpolate_backward"]

THREADS = 128


@functools.lru_cache(maxsize=256)
def _axis_tables(n_in, n_out, mode, align_corners, scale, dtype):
    """Device tables of one axis: taps ``idx``, ``w`` (n_out, K) and each source's range ``lo``, ``hi`` (n_in,)."""
    idx, w = axis_taps(n_in, n_out, mode, align_corners, scale, np.dtype(dtype))
    src = np.arange(n_in)
    lo = np.searchsorted(idx[:, -1], src, side="left")  # first d whose last tap is >= p
    hi = np.searchsorted(idx[:, 0], src, side="right")  # first d whose first tap is > p
    # np.array copies: axis_taps' tables are read-only, and launches may write arguments back (simulator).
    return tuple(cc.as_input(np.array(a)) for a in (idx, w, lo.astype(np.int64), hi.astype(np.int64)))


def _tables(in_hw, out_hw, mode, align_corners, scales, dtype):
    return [
        _axis_tables(int(in_hw[a]), int(out_hw[a]), mode, bool(align_corners), float(scales[a]), np.dtype(dtype))
        for a in range(2)
    ]


@cuda.jit
def _forward_kernel(x, y, idx_h, w_h, idx_w, w_w):
    """Thread e computes y.flat[e] from the K x K taps of its (i, j)."""
    e = cuda.grid(1)
    if e >= y.size:
        return
    _, c_n, ho, wo = y.shape
    n, c, i, j = cc.unravel4(e, c_n, ho, wo)
    acc = y.dtype.type(0)
    for a in range(idx_h.shape[1]):
        row = y.dtype.type(0)
        for b in range(idx_w.shape[1]):
            row += w_w[j, b] * x[n, c, idx_h[i, a], idx_w[j, b]]
        acc += w_h[i, a] * row
    y[n, c, i, j] = acc


def interpolate_forward(x, out_size, mode, align_corners, scales):
    """y (N, C, Ho, Wo) = A_h x A_w^T per plane, one thread per output element."""
    x = cc.as_input(x)
    n, c, h, w = x.shape
    (idx_h, w_h, _, _), (idx_w, w_w, _, _) = _tables((h, w), out_size, mode, align_corners, scales, x.dtype)
    y = cc.empty((n, c, out_size[0], out_size[1]), x.dtype)
    _forward_kernel[cc.blocks(y.size, THREADS), THREADS](x, y, idx_h, w_h, idx_w, w_w)
    return y


@cuda.jit
def _backward_kernel(gy, gx, idx_h, w_h, lo_h, hi_h, idx_w, w_w, lo_w, hi_w):
    """Thread e computes gx.flat[e] = sum over the destinations whose taps read it (module docstring)."""
    e = cuda.grid(1)
    if e >= gx.size:
        return
    _, c_n, h_in, w_in = gx.shape
    n, c, p, q = cc.unravel4(e, c_n, h_in, w_in)
    zero = gx.dtype.type(0)
    acc = zero
    for i in range(lo_h[p], hi_h[p]):
        a_hp = zero  # A_h[i, p]
        for a in range(idx_h.shape[1]):
            if idx_h[i, a] == p:
                a_hp += w_h[i, a]
        row = zero
        for j in range(lo_w[q], hi_w[q]):
            a_wq = zero  # A_w[j, q]
            for b in range(idx_w.shape[1]):
                if idx_w[j, b] == q:
                    a_wq += w_w[j, b]
            row += a_wq * gy[n, c, i, j]
        acc += a_hp * row
    gx[n, c, p, q] = acc


def interpolate_backward(gy, in_shape, mode, align_corners, scales):
    """gx (in_shape) = A_h^T gy A_w per plane, one thread per input element (a gather)."""
    gy = cc.as_input(gy)
    n, c, h, w = in_shape
    tables_h, tables_w = _tables((h, w), gy.shape[2:], mode, align_corners, scales, gy.dtype)
    gx = cc.empty((n, c, h, w), gy.dtype)
    _backward_kernel[cc.blocks(gx.size, THREADS), THREADS](gy, gx, *tables_h, *tables_w)
    return gx


def _signatures(template):
    """PTX signatures for float32 and float64; {A} is a C-contiguous 4-D float array."""
    return cc.float_signatures(template, A="{t}[:, :, :, ::1]")


_TAPS = "int64[:, ::1], {t}[:, ::1]"  # idx, w of one axis
_RANGES = "int64[::1], int64[::1]"  # lo, hi of one axis
PTX_SIGNATURES = [
    (_forward_kernel, _signatures(f"void({{A}}, {{A}}, {_TAPS}, {_TAPS})")),
    (_backward_kernel, _signatures(f"void({{A}}, {{A}}, {_TAPS}, {_RANGES}, {_TAPS}, {_RANGES})")),
]
