"""interpolate on the CPU: separable taps in Numba, gathering in both directions.

The math is in ``reference.py``: ``y = A_h x A_w^T`` and ``gx = A_h^T gy A_w``, with
the nonzeros of each axis matrix given by ``reference.axis_taps`` (the same
torch-exact coordinate arithmetic, computed once per shape and cached).

The general path (any sizes, every mode)
----------------------------------------
Forward, per (n, c) plane:

1. horizontal: ``t[r, :] = sum_k w_w[:, k] * x[r, idx_w[:, k]]`` for each input row r
   that some output row reads -- computed lazily, once per plane, so downsampling
   skips unread rows and upsampling does not redo a shared row;
2. vertical: ``y[i, :] = sum_k w_h[i, k] * t[idx_h[i, k], :]``, contiguous rows that
   LLVM vectorises.

Backward, per plane, as a *gather* (no two threads ever write the same element,
so no atomics and no races): every input index ``p`` owns the list of
``(output index, weight)`` pairs that read it -- the columns of ``A``, built from
the taps in CSR form (``_adjoint_lists``). Then

1. vertical: ``s[:] = sum_{(i, w) in list_h(r)} w * gy[i, :]`` for input row r
   (contiguous rows again);
2. horizontal: ``gx[r, q] = sum_{(j, w) in list_w(q)} w * s[j]``.

Inputs that no output reads have empty lists and get 0.

The x2 fast path (bilinear, align_corners=False, both axes doubled)
-------------------------------------------------------------------
The U-Net decoder upsamples by exactly 2, and there the taps are one pattern
(``s = 1/2``, so ``src = d/2 - 1/4``): away from the borders

    output 2m   = 1/4 * in[m-1] + 3/4 * in[m]        output 2m+1 = 3/4 * in[m] + 1/4 * in[m+1]
    input  p    <- outputs 2p-1, 2p, 2p+1, 2p+2 with weights 1/4, 3/4, 3/4, 1/4 (the adjoint).

The general horizontal steps above read ``x[r, idx_w[j, k]]`` / ``s[out_w[e]]``
through index tables: an index load, then a load from that index, per element,
which LLVM cannot turn into contiguous vector loads, so they run several times
slower than memory can deliver. With the pattern known, the
indices are affine in the loop counter (``2k+2``, ``k``, ``k+1``, ...): LLVM
vectorises the loop with contiguous loads plus a permute that interleaves
(forward) or splits (backward) the even and odd columns. Three more things keep
the vector units busy:

* the horizontal step runs over a whole plane as one flat row (a 16-pixel row
  alone is too short for the vector loop, which would leave most of it to the
  scalar remainder); at each row's ends this mixes in the neighbouring row,
  and those border columns are then overwritten from the tables;
* the border columns go column by column (their taps are the same for every
  row), not pixel by pixel through the tables' loops;
* the vertical step writes each output row once (forward) or each input row's
  ``s`` once (backward), instead of once per tap.

``_x2_weights`` checks the pattern on the tables themselves (taps and CSR lists,
once per shape, cached) and otherwise the general path runs -- e.g. for
``scale_factor=2.04`` (``2n`` outputs but another step), align_corners=True,
nearest, axes of fewer than 3 pixels, or x2 on one axis only. Border outputs
(forward: 0, 1, 2n-2, 2n-1) and inputs (backward: 0, 1, n-1) read their taps
from the tables as the general path does, and every sum runs in the general
path's order from the same weights (both in the data's dtype), so both paths
give identical bits. ``interpolate_path`` says which path a resize takes.

Parallelism (both paths): planes are split into chunks (a few per thread for
balance), each with its own small scratch buffer allocated once per chunk;
every output is fresh.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import get_num_threads, njit, prange

from .reference import axis_taps

__all__ = ["interpolate_forward", "interpolate_backward"]


@functools.lru_cache(maxsize=256)
def _adjoint_lists(n_in, n_out, mode, align_corners, scale, dtype):
    """CSR of A's columns: for input p, (out[start[p]:start[p+1]], weight[...]) are the outputs reading it."""
    idx, w = axis_taps(n_in, n_out, mode, align_corners, scale, dtype)
    flat = idx.ravel()
    order = np.argsort(flat, kind="stable")  # by input, then by output index
    out = (np.arange(flat.size) // idx.shape[1])[order]
    start = np.zeros(n_in + 1, np.int64)
    np.cumsum(np.bincount(flat, minlength=n_in), out=start[1:])
    return start, out.astype(np.int64), np.ascontiguousarray(w.ravel()[order])


@functools.lru_cache(maxsize=256)
def _x2_weights(n_in, n_out, mode, align_corners, scale, dtype):
    """``[[e0, e1], [o0, o1]]`` if this axis is an exact x2 pattern, else None.

    The pattern, checked on the tables the general path uses: for 1 <= m <= n_in-2,
    output 2m reads (m-1, m) with weights (e0, e1) and output 2m+1 reads (m, m+1)
    with (o0, o1); for 2 <= p <= n_in-2, input p's CSR list is exactly outputs
    (2p-1, 2p, 2p+1, 2p+2) with weights (o1, e1, o0, e0). The rest are borders.
    """
    if mode != "bilinear" or n_in < 3 or n_out != 2 * n_in:
        return None
    idx, w = axis_taps(n_in, n_out, mode, align_corners, scale, dtype)
    pattern = w[2:4]  # outputs 2 and 3: the even and odd weights of m = 1
    m = np.arange(1, n_in - 1)[:, None]
    taps_ok = (
        (idx[2 * m[:, 0]] == np.hstack([m - 1, m])).all()
        and (idx[2 * m[:, 0] + 1] == np.hstack([m, m + 1])).all()
        and (w[2 * m[:, 0]] == pattern[0]).all()
        and (w[2 * m[:, 0] + 1] == pattern[1]).all()
    )
    start, out, wt = _adjoint_lists(n_in, n_out, mode, align_corners, scale, dtype)
    p = np.arange(2, n_in - 1)[:, None]
    entries = start[p] + np.arange(4)
    lists_ok = (
        (start[p + 1] - start[p] == 4).all()
        and (out[entries] == 2 * p + np.arange(-1, 3)).all()
        and (wt[entries] == [pattern[1, 1], pattern[0, 1], pattern[1, 0], pattern[0, 0]]).all()
    )
    return pattern if taps_ok and lists_ok else None


def _chunks(planes):
    return max(1, min(planes, 4 * get_num_threads()))


@njit(cache=True)
def _mix(out, a, u, b, v):
    """out[:] = a * u + b * v (two taps of one output, in the general path's order)."""
    for j in range(out.shape[0]):
        out[j] = a * u[j] + b * v[j]


@njit(cache=True)
def _gather_rows(g, start, out, wt, r, s):
    """s[:] = sum over input r's CSR list of weight * g[output, :], from 0, in list order."""
    s[:] = 0
    for e in range(start[r], start[r + 1]):
        a = wt[e]
        i = out[e]
        for j in range(s.shape[0]):
            s[j] += a * g[i, j]


@njit(cache=True)
def _gather(s, start, out, wt, q):
    """sum over input q's CSR list of weight * s[output], from 0, in list order."""
    acc = s.dtype.type(0)
    for e in range(start[q], start[q + 1]):
        acc += wt[e] * s[out[e]]
    return acc


@njit(parallel=True, cache=True)
def _forward_kernel(x, idx_h, w_h, idx_w, w_w, y, first, n_chunks):
    """x (N*C, h, w) planes; y (N, C_y, ho, wo): plane (n, c) of x fills y[n, first + c] (first = 0 and
    C_y = C for interpolate; ``kernels/interpolate_cat`` writes into the channels after a skip's)."""
    planes, h, _ = x.shape
    ho, wo = y.shape[2], y.shape[3]
    channels = planes // y.shape[0]
    for c in prange(n_chunks):
        t = np.empty((h, wo), x.dtype)  # horizontally interpolated input rows
        done = np.full(h, -1, np.int64)  # plane for which row r of t is valid
        for p in range(c * planes // n_chunks, (c + 1) * planes // n_chunks):
            yp = y[p // channels, first + p % channels]
            for i in range(ho):
                for k in range(idx_h.shape[1]):
                    r = idx_h[i, k]
                    if done[r] != p:
                        done[r] = p
                        for j in range(wo):
                            acc = w_w[j, 0] * x[p, r, idx_w[j, 0]]
                            for kk in range(1, idx_w.shape[1]):
                                acc += w_w[j, kk] * x[p, r, idx_w[j, kk]]
                            t[r, j] = acc
                a = w_h[i, 0]
                r = idx_h[i, 0]
                for j in range(wo):
                    yp[i, j] = a * t[r, j]
                for k in range(1, idx_h.shape[1]):
                    a = w_h[i, k]
                    r = idx_h[i, k]
                    for j in range(wo):
                        yp[i, j] += a * t[r, j]


@njit(parallel=True, cache=True)
def _backward_kernel(gy, first, start_h, out_h, wt_h, start_w, out_w, wt_w, gx, n_chunks):
    """gy (N, C_y, ho, wo); gx (N*C, h, w) planes: plane (n, c) of gx from gy[n, first + c] (as the forward)."""
    wo = gy.shape[3]
    planes, h, w = gx.shape
    channels = planes // gy.shape[0]
    for c in prange(n_chunks):
        s = np.empty(wo, gy.dtype)  # one input row's share of gy, still at output width
        for p in range(c * planes // n_chunks, (c + 1) * planes // n_chunks):
            gp = gy[p // channels, first + p % channels]
            for r in range(h):
                _gather_rows(gp, start_h, out_h, wt_h, r, s)
                for q in range(w):
                    gx[p, r, q] = _gather(s, start_w, out_w, wt_w, q)


@njit(cache=True)
def _x2_rows(src, idx, wts, pattern, out):
    """Every row of src (rows, n) upsampled x2 into out (rows, 2n).

    The pattern runs over the plane as one flat row, so the vector loop is long even
    for narrow rows; at each row's ends it mixes in the neighbouring row, and those
    4 border outputs per row are then overwritten from the taps.
    """
    rows, n = src.shape
    flat_src, flat_out = src.reshape(rows * n), out.reshape(rows * 2 * n)
    e0, e1, o0, o1 = pattern[0, 0], pattern[0, 1], pattern[1, 0], pattern[1, 1]
    for k in range(rows * n - 2):  # m = k + 1; indices written so LLVM sees them >= 0 (no wraparound check)
        flat_out[2 * k + 2] = e0 * flat_src[k] + e1 * flat_src[k + 1]
        flat_out[2 * k + 3] = o0 * flat_src[k + 1] + o1 * flat_src[k + 2]
    for j in (0, 1, 2 * n - 2, 2 * n - 1):  # column by column: its taps are the same for every row
        a, i0, b, i1 = wts[j, 0], idx[j, 0], wts[j, 1], idx[j, 1]
        for r in range(rows):
            out[r, j] = a * src[r, i0] + b * src[r, i1]


@njit(cache=True)
def _x2_adjoint_rows(s, start, out, wt, pattern, g):
    """Every row of s (rows, 2n) through the adjoint of the x2 pattern into g (rows, n).

    As in _x2_rows, one flat loop over the plane, then the border inputs of each row
    (0, 1, n-1) overwritten from their CSR lists.
    """
    rows, n = g.shape
    flat_s, flat_g = s.reshape(rows * 2 * n), g.reshape(rows * n)
    e0, e1, o0, o1 = pattern[0, 0], pattern[0, 1], pattern[1, 0], pattern[1, 1]
    zero = s.dtype.type(0)
    for k in range(rows * n - 3):  # q = k + 2 reads outputs 2q-1 .. 2q+2, summed from 0 in CSR order
        acc = ((zero + o1 * flat_s[2 * k + 3]) + e1 * flat_s[2 * k + 4]) + o0 * flat_s[2 * k + 5]
        flat_g[k + 2] = acc + e0 * flat_s[2 * k + 6]
    for q in (0, 1, n - 1):  # column by column: its CSR list is the same for every row
        g[:, q] = 0
        for e in range(start[q], start[q + 1]):
            a, j = wt[e], out[e]
            for r in range(rows):
                g[r, q] += a * s[r, j]


@njit(parallel=True, cache=True)
def _forward_x2_kernel(x, idx_h, w_h, pattern_h, idx_w, w_w, pattern_w, y, first, n_chunks):
    """As ``_forward_kernel`` (y (N, C_y, 2h, 2w), plane (n, c) into y[n, first + c]), by the x2 pattern."""
    planes, h, w = x.shape
    channels = planes // y.shape[0]
    e0, e1, o0, o1 = pattern_h[0, 0], pattern_h[0, 1], pattern_h[1, 0], pattern_h[1, 1]
    for c in prange(n_chunks):
        t = np.empty((h, 2 * w), x.dtype)  # every input row, upsampled horizontally
        for p in range(c * planes // n_chunks, (c + 1) * planes // n_chunks):
            yp = y[p // channels, first + p % channels]
            _x2_rows(x[p], idx_w, w_w, pattern_w, t)
            for k in range(h - 2):  # output rows 2m, 2m+1 for m = k + 1
                _mix(yp[2 * k + 2], e0, t[k], e1, t[k + 1])
                _mix(yp[2 * k + 3], o0, t[k + 1], o1, t[k + 2])
            for i in (0, 1, 2 * h - 2, 2 * h - 1):
                _mix(yp[i], w_h[i, 0], t[idx_h[i, 0]], w_h[i, 1], t[idx_h[i, 1]])


@njit(parallel=True, cache=True)
def _backward_x2_kernel(gy, first, start_h, out_h, wt_h, pattern_h, start_w, out_w, wt_w, pattern_w, gx, n_chunks):
    """As ``_backward_kernel`` (gx plane (n, c) from gy[n, first + c]), by the adjoint of the x2 pattern."""
    wo = gy.shape[3]
    planes, h = gx.shape[0], gx.shape[1]
    channels = planes // gy.shape[0]
    e0, e1, o0, o1 = pattern_h[0, 0], pattern_h[0, 1], pattern_h[1, 0], pattern_h[1, 1]
    zero = gy.dtype.type(0)
    for c in prange(n_chunks):
        s = np.empty((h, wo), gy.dtype)  # every input row's share of gy, still at output width
        for p in range(c * planes // n_chunks, (c + 1) * planes // n_chunks):
            gp = gy[p // channels, first + p % channels]
            for r in range(h):
                if 2 <= r < h - 1:  # rows 2r-1 .. 2r+2 of gy, summed from 0 in CSR order
                    g0, g1, g2, g3 = gp[2 * r - 1], gp[2 * r], gp[2 * r + 1], gp[2 * r + 2]
                    for j in range(wo):
                        s[r, j] = (((zero + o1 * g0[j]) + e1 * g1[j]) + o0 * g2[j]) + e0 * g3[j]
                else:
                    _gather_rows(gp, start_h, out_h, wt_h, r, s[r])
            _x2_adjoint_rows(s, start_w, out_w, wt_w, pattern_w, gx[p])


def _tables(dtype, in_hw, out_hw, mode, align_corners, scales, make):
    """make(...) for the H then the W axis: its taps, CSR adjoint lists or x2 weights."""
    return [make(in_hw[a], out_hw[a], mode, align_corners, float(scales[a]), np.dtype(dtype)) for a in range(2)]


def _x2_patterns(dtype, in_hw, out_hw, mode, align_corners, scales):
    """The x2 weights of both axes, or None when either axis is not an exact x2 pattern."""
    patterns = _tables(dtype, in_hw, out_hw, mode, align_corners, scales, _x2_weights)
    return None if any(p is None for p in patterns) else patterns


def interpolate_path(dtype, in_hw, out_hw, mode, align_corners, scales):
    """Which kernels a resize runs on: 'x2' (the fast path) or 'general'."""
    return "general" if _x2_patterns(dtype, in_hw, out_hw, mode, align_corners, scales) is None else "x2"


def interpolate_forward(x, out_size, mode, align_corners, scales):
    n, c = x.shape[:2]
    y = np.empty((n, c, *out_size), x.dtype)
    interpolate_into(y, 0, x, mode, align_corners, scales)
    return y


def interpolate_into(y, first, x, mode, align_corners, scales):
    """y[:, first : first + C] = the resize of x (N, C, h, w) to y's (ho, wo), in place: y (N, C_y, ho, wo) is
    C-contiguous, and only those channels are written (``interpolate_forward``: all of a fresh y)."""
    n, c, h, w = x.shape
    args = (x.dtype, (h, w), tuple(y.shape[2:]), mode, align_corners, scales)
    (idx_h, w_h), (idx_w, w_w) = _tables(*args, axis_taps)
    x_planes = x.reshape(n * c, h, w)
    patterns = _x2_patterns(*args)
    if patterns is None:
        _forward_kernel(x_planes, idx_h, w_h, idx_w, w_w, y, first, _chunks(n * c))
    else:
        _forward_x2_kernel(x_planes, idx_h, w_h, patterns[0], idx_w, w_w, patterns[1], y, first, _chunks(n * c))


def interpolate_backward(gy, in_shape, mode, align_corners, scales):
    return interpolate_backward_from(gy, 0, in_shape, mode, align_corners, scales)


def interpolate_backward_from(gy, first, in_shape, mode, align_corners, scales):
    """gx (``in_shape``) of the resize whose output gradient is gy[:, first : first + C]: gy (N, C_y, ho, wo) is
    C-contiguous and only those channels are read (``interpolate_backward``: all of gy)."""
    n, c, h, w = in_shape
    ho, wo = gy.shape[2:]
    gx = np.empty(in_shape, gy.dtype)
    args = (gy.dtype, (h, w), (ho, wo), mode, align_corners, scales)
    lists_h, lists_w = _tables(*args, _adjoint_lists)
    gx_planes = gx.reshape(n * c, h, w)
    patterns = _x2_patterns(*args)
    if patterns is None:
        _backward_kernel(gy, first, *lists_h, *lists_w, gx_planes, _chunks(n * c))
    else:
        _backward_x2_kernel(gy, first, *lists_h, patterns[0], *lists_w, patterns[1], gx_planes, _chunks(n * c))
    return gx
