"""interpolate, the definition: resizing as two small matrices, and its adjoint.

Forward
-------
Resizing is *separable*: every output row mixes input rows with the same weights
whatever the column, and every output column mixes input columns likewise. With
one interpolation matrix per axis, ``A_h`` (Ho x H) and ``A_w`` (Wo x W), each
(n, c) plane is::

    y[n, c] = A_h @ x[n, c] @ A_w^T          y[i, j] = sum_{p, q} A_h[i, p] x[p, q] A_w[j, q]

Row ``d`` of an axis matrix holds the weights with which destination index ``d``
reads the source axis; it has one nonzero (nearest modes) or two (bilinear), the
*taps* that :func:`axis_taps` returns. With ``s`` the source-per-destination step
(``scales`` below) and ``n_in`` / ``n_out`` the axis lengths:

* ``nearest``:        ``A[d, min(floor(d*s), n_in-1)] = 1``
* ``nearest-exact``:  ``A[d, min(floor((d + 0.5)*s), n_in-1)] = 1`` (pixel centres)
* ``bilinear``: a source coordinate ``src`` between two pixels ``i0 = floor(src)``
  and ``i1 = min(i0 + 1, n_in-1)``, with ``lam = src - i0``::

      A[d, i0] += 1 - lam,   A[d, i1] += lam
      align_corners=True:   src = d * (n_in-1)/(n_out-1)          (0 if n_out == 1): corner pixels map to corners
      align_corners=False:  src = max((d + 0.5)*s - 0.5, 0)       pixel centres map to pixel centres

  (``src <= n_in - 1`` always, except when upsampling with align_corners=False,
  where the last destinations have ``i0 = i1 = n_in - 1``: they copy the border.)

The forward applies each axis matrix through its taps (``y = sum_k w_k * x[idx_k]``,
first along H, then along W), so a NaN or inf only reaches the outputs that read it.

Matching torch index for index
------------------------------
Nearest selection is discontinuous, so the arithmetic must be torch's to the bit
(``aten/src/ATen/native/UpSample.h`` and ``cpu/UpSampleKernel.cpp``; checked
against torch 2.13 on every size pair up to 40 and many scale factors):

* ``s`` is the float32 value of the step (``float(1/scale_factor)`` or
  ``float(n_in)/n_out``), and ``d*s``, ``(d + 0.5)*s`` are float32 products, for
  float32 **and** float64 inputs. E.g. 26 -> 22 pixels by size: ``s = 26/22``
  rounds down in float32 and ``11*s = 12.9999994``, so destination 11 reads
  pixel 12, where the exact ``11*26/22 = 13`` (and float64) would read pixel 13.
* ``nearest`` (not ``nearest-exact``) copies when ``n_out == n_in`` and takes
  ``d // 2`` when ``n_out == 2*n_in``, whatever ``s`` is: with
  ``scale_factor=2.04`` on 10 pixels (20 outputs) destination 2 reads pixel 1,
  not ``floor(2/2.04) = 0``.
* ``bilinear`` copies when ``n_out == n_in``; otherwise it computes in the input's
  dtype, and for float32 ``(d + 0.5)*s - 0.5`` is one fused multiply-add (one
  rounding), which the float64 evaluation below reproduces exactly. For float64
  torch's weights differ from these in the last bit or two (a relative
  difference of a few 2**-52, i.e. ~1e-15).

Backward
--------
y is linear in x, so the gradient is the adjoint map. Writing the forward as
``y = A_h x A_w^T`` and ``L`` for the loss with ``gy = dL/dy``::

    dL = sum_{i,j} gy[i, j] dy[i, j] = <gy, A_h dx A_w^T> = trace(gy^T A_h dx A_w^T)
       = trace(A_w^T gy^T A_h dx) = <A_h^T gy A_w, dx>

so ``gx[n, c] = A_h^T @ gy[n, c] @ A_w``: every input pixel collects the gradient
of every output pixel that read it, times the weight it was read with. Pixels
that no output reads (nearest downsampling) get 0. The identity
``<up(x), g> = <x, up^T(g)>`` is what the tests check.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["interpolate_forward", "interpolate_backward"]


@functools.lru_cache(maxsize=256)
def axis_taps(n_in: int, n_out: int, mode: str, align_corners: bool, scale: float, dtype):
    """The nonzeros of one axis matrix A (n_out x n_in): ``A[d, idx[d, k]] += w[d, k]``.

    Returns ``idx`` (n_out, K) int64 and ``w`` (n_out, K) of ``dtype``, K = 1 for the
    nearest modes and 2 for bilinear; read-only (cached, shared by every backend).
    """
    dtype = np.dtype(dtype)
    d = np.arange(n_out)
    if mode == "bilinear":
        if n_out == n_in:
            src = d.astype(dtype)
        elif align_corners:
            step = dtype.type(n_in - 1) / dtype.type(n_out - 1) if n_out > 1 else dtype.type(0)
            src = step * d.astype(dtype)
        else:
            # float64 gives float32's fused multiply-add exactly: s*(d + 0.5) is exact in
            # float64 (two 24-bit factors), the -0.5 too, and the one rounding is astype.
            step = np.float64(dtype.type(scale))
            src = np.maximum((step * (d + 0.5) - 0.5).astype(dtype), 0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        lam = np.clip(src - i0.astype(dtype), 0, 1)
        i1 = i0 if n_out == n_in else np.minimum(i0 + 1, n_in - 1)
        idx = np.stack([i0, i1], axis=1)
        w = np.stack([1 - lam, lam], axis=1).astype(dtype)
    else:
        step = np.float32(scale)
        if mode == "nearest" and n_out == n_in:
            src_idx = d
        elif mode == "nearest" and n_out == 2 * n_in:
            src_idx = d // 2
        else:
            offset = np.float32(0.5 if mode == "nearest-exact" else 0.0)
            src_idx = np.floor((d.astype(np.float32) + offset) * step).astype(np.int64)
        idx = np.minimum(src_idx, n_in - 1)[:, None]
        w = np.ones((n_out, 1), dtype)
    idx.flags.writeable = False
    w.flags.writeable = False
    return idx, w


def axis_matrix(n_in, n_out, mode, align_corners, scale, dtype) -> np.ndarray:
    """The dense (n_out x n_in) interpolation matrix A of one axis."""
    idx, w = axis_taps(n_in, n_out, mode, align_corners, float(scale), np.dtype(dtype))
    a = np.zeros((n_out, n_in), dtype)
    np.add.at(a, (np.arange(n_out)[:, None], idx), w)  # both bilinear taps may hit one pixel
    return a


def _apply_taps(x, axis, idx, w):
    """sum_k w[:, k] * x.take(idx[:, k], axis): one axis matrix applied along ``axis``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return sum(w[:, k].reshape(shape) * np.take(x, idx[:, k], axis=axis) for k in range(idx.shape[1]))


def interpolate_forward(x, out_size, mode, align_corners, scales):
    """y[n, c] = A_h @ x[n, c] @ A_w^T, applied tap by tap: (N, C, H, W) -> (N, C, Ho, Wo)."""
    for axis, n_out, s in ((2, out_size[0], scales[0]), (3, out_size[1], scales[1])):
        idx, w = axis_taps(x.shape[axis], n_out, mode, align_corners, float(s), x.dtype)
        x = _apply_taps(x, axis, idx, w)
    return np.ascontiguousarray(x)


def interpolate_backward(gy, in_shape, mode, align_corners, scales):
    """gx[n, c] = A_h^T @ gy[n, c] @ A_w (the adjoint of the forward)."""
    (h, w), (ho, wo) = in_shape[2:], gy.shape[2:]
    a_h = axis_matrix(h, ho, mode, align_corners, scales[0], gy.dtype)
    a_w = axis_matrix(w, wo, mode, align_corners, scales[1], gy.dtype)
    return np.ascontiguousarray(a_h.T @ gy @ a_w)
