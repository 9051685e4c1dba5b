"""interpolate on the CPU: separable taps in Numba, gathering in both directions.

The math is in ``reference.py``: ``y = A_h x A_w^T`` and ``gx = A_h^T gy A_w``, with
the nonzeros of each axis matrix given by ``reference.axis_taps`` (the same
torch-exact coordinate arithmetic, computed once per shape and cached).

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

Inputs that no output reads have empty lists and get 0. Parallelism: planes are
split into chunks (a few per thread for balance), each with its own small scratch
buffer allocated once per chunk; every output is fresh.
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


def _chunks(planes):
    return max(1, min(planes, 4 * get_num_threads()))


@njit(parallel=True, cache=True)
def _forward_kernel(x, idx_h, w_h, idx_w, w_w, y, n_chunks):
    planes, h, _ = x.shape
    ho, wo = y.shape[1], y.shape[2]
    for c in prange(n_chunks):
        t = np.empty((h, wo), x.dtype)  # horizontally interpolated input rows
        done = np.full(h, -1, np.int64)  # plane for which row r of t is valid
        for p in range(c * planes // n_chunks, (c + 1) * planes // n_chunks):
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
                    y[p, i, j] = a * t[r, j]
                for k in range(1, idx_h.shape[1]):
                    a = w_h[i, k]
                    r = idx_h[i, k]
                    for j in range(wo):
                        y[p, i, j] += a * t[r, j]


@njit(parallel=True, cache=True)
def _backward_kernel(gy, start_h, out_h, wt_h, start_w, out_w, wt_w, gx, n_chunks):
    planes, ho, wo = gy.shape
    h, w = gx.shape[1], gx.shape[2]
    zero = wt_w[0] * 0  # 0 in the data's dtype
    for c in prange(n_chunks):
        s = np.empty(wo, gy.dtype)  # one input row's share of gy, still at output width
        for p in range(c * planes // n_chunks, (c + 1) * planes // n_chunks):
            for r in range(h):
                s[:] = 0
                for e in range(start_h[r], start_h[r + 1]):
                    a = wt_h[e]
                    i = out_h[e]
                    for j in range(wo):
                        s[j] += a * gy[p, i, j]
                for q in range(w):
                    acc = zero
                    for e in range(start_w[q], start_w[q + 1]):
                        acc += wt_w[e] * s[out_w[e]]
                    gx[p, r, q] = acc


def _tables(dtype, in_hw, out_hw, mode, align_corners, scales, adjoint=False):
    """The per-axis tables of H then W, flattened into one argument list: taps, or their CSR adjoint."""
    make = _adjoint_lists if adjoint else axis_taps
    per_axis = (make(in_hw[a], out_hw[a], mode, align_corners, float(scales[a]), np.dtype(dtype)) for a in range(2))
    return [table for tables in per_axis for table in tables]


def interpolate_forward(x, out_size, mode, align_corners, scales):
    n, c, h, w = x.shape
    y = np.empty((n, c, *out_size), x.dtype)
    taps = _tables(x.dtype, (h, w), out_size, mode, align_corners, scales)
    _forward_kernel(x.reshape(n * c, h, w), *taps, y.reshape(n * c, *out_size), _chunks(n * c))
    return y


def interpolate_backward(gy, in_shape, mode, align_corners, scales):
    n, c, h, w = in_shape
    ho, wo = gy.shape[2:]
    gx = np.empty(in_shape, gy.dtype)
    lists = _tables(gy.dtype, (h, w), (ho, wo), mode, align_corners, scales, adjoint=True)
    _backward_kernel(gy.reshape(n * c, ho, wo), *lists, gx.reshape(n * c, h, w), _chunks(n * c))
    return gx
