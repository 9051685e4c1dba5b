"""conv2d on the CPU in numbered versions: from direct loops to BLAS GEMMs and a register-blocked micro-kernel.

Read ``reference.py`` first: it defines the op and derives the gradients. Here
the same sums run compiled (Numba), in parallel over the cores. Notation (as
in the reference)::

    x (N, C_in, H, W)   w (C_out, Cg, kh, kw)   y, gy (N, C_out, Ho, Wo)
    G groups, Cg = C_in/G input and Og = C_out/G output channels per group;
    output (i, j) reads, through tap (p, q), the input pixel
        h = i*sh - pt + p*dh,   v = j*sw - pl + q*dw     (zero outside [0, H) x [0, W))

Versions (llm.c dev/cuda style, as ``cuda.py``): each function takes
``version=k``; ``FORWARD_VERSIONS``, ``GRAD_INPUT_VERSIONS`` and
``GRAD_WEIGHT_VERSIONS`` list them, tests/kernels/test_conv2d.py checks every
one against the reference, and ``python -m benchmarks ops --only conv2d``
times every one against torch. The defaults are the fastest measured so far (v5; v6 for grad_weight).

* **v1 direct** -- the reference's sums as plain loops: one output plane
  (image, channel) per ``prange`` iteration, and for each output pixel the
  Cg*kh*kw-term dot product, skipping taps that fall in the padding.
  grad_input is the *gather* of the same index map (each input pixel sums over
  the taps and channels that read it: no two iterations write the same
  value, so no locks), grad_weight one weight plane (o, c) per iteration
  summing over N*Ho*Wo. Short and easy to check; slow because the innermost
  loop runs over the kh*kw taps with a bounds test each, walks x with stride
  dw (not along a row), and reuses nothing: every product loads both
  operands, so memory and loop overhead bound it, not the multipliers.
* **v2 im2col + GEMM** -- per image and band of output rows, copy every
  receptive field into a column, then one BLAS GEMM per group does the
  Og x Cg*kh*kw x pixels product (see *im2col* below). The GEMM is blocked for
  the caches and registers by BLAS, which is written to run near the FMA peak; the
  price is the copy of x kh*kw times, and the col2im scatter for grad_input.
* **v3 taps** -- at stride 1, no column matrix at all: each tap
  (p, q) is one GEMM on a *shifted view* of a padded band of x (see *Taps*
  below), so x is copied once per band instead of kh*kw times, and grad_input
  is a forward of gy with the flipped kernel (no col2im). Strided
  convolutions fall back to v2's im2col.
* **v4 register-blocked micro-kernels** -- the same padded bands as v3
  (strided convolutions: v2), but instead of kh*kw BLAS calls that each
  stream the band and the wide output through the cache, a Numba micro-kernel
  (``_micro_tile``) computes a block of MR = 6 output channels x NR = 16
  pixels with *all* Cg*kh*kw terms of its sum in registers: per term it loads
  NR inputs (in place from the band: no packing of x) and MR weights (packed
  once per call) and does MR*NR fused multiply-adds, then writes the finished
  block to y with the bias. The band is read once per channel block, the
  output written once, and small channel counts (the 3->16 first layer, the
  1x1 head) are not many small BLAS calls. grad_input is the flipped forward
  with the same micro-kernel. grad_weight (``_micro_dots``) computes MW = 4
  channels x KT = 3 weights at once, each a dot product of a gy row with a
  shifted band row over all the band's pixels: per vector of pixels, 7 loads
  and 12 FMAs into 12 vector accumulators, summed across lanes at the end.
  tests/kernels/test_conv2d.py checks in the compiled code that the
  accumulators stay in registers. LLVM vectorises both with 256-bit registers
  (12 ymm accumulators), as it prefers on AVX-512 CPUs, so they can use at
  most half of the 512-bit FMA width; with ``NUMBA_CPU_FEATURES`` = the
  host's features plus ``,-prefer-256-bit`` they use 512-bit registers and
  NR = 32 (see ``NR``). The benchmark below shows v4 at about half of v3.
* **v5 explicit 512-bit micro-kernels** (default) -- v4's plan with the
  micro-kernels written as vector code (``microkernels.py``: Numba intrinsics
  that emit LLVM IR with 16-float vectors, so the register width is ours to
  choose, not the auto-vectoriser's). The forward block is MR5 = 8 output
  channels x NV5 = 3 vectors (48 float32 pixels): 24 zmm accumulators, which
  start from the bias; per term 3 vector loads, 8 broadcast weights, 24 FMAs.
  The vectors of a block are listed in small offset tables, so when Wo is a
  whole number of vectors the blocks read the band row by row and write y in
  place -- no wide buffer, no garbage columns, no copy pass -- and a last
  channel block that would run past Og starts at Og - MR5 (the overlap is
  computed twice, to the same values). grad_weight's block is MW5 = 4
  channels x KT5 = 5 weights, dot products over ~``_DOTS_VECTORS`` vectors
  of gy read in place (bands of rows, or runs of whole small images). Other
  widths take the wide layout with zero padding (as v4). Narrow outputs
  (Og < 8, e.g. the 1x1 head) use blocks of 4 channels, and a 1x1 kernel
  without padding reads x itself as its band (no copy). The tests check in
  the machine code that every FMA is a zmm one and nothing spills.
* **v6 grad_weight as outer products** (grad_weight's default) -- v5's dot
  products end with a sum across the lanes of every accumulator, and their
  x rows start at every tap's shift, so most vector loads straddle two cache
  lines. v6 turns the product around: ``gw[o, (c, p, q)] = sum over pixels of
  gy^T[pixel, o] * x[c, pixel + (p, q)]``, a vector of MO6 x 16 output channels
  of gy^T times one value of x, *broadcast* to all lanes (the FMA reads it
  straight from memory, no alignment needed), accumulated over all the pixels
  of a few rows (``tile_outer``: 2 vectors x 9 taps, or 1 vector x the taps of
  3 channels, 18 or 27 zmm accumulators). gy^T (each pixel's channels
  consecutive) is made a few rows at a time, just before the outer products
  read it from L1, by 16 x 16 transposes in registers (``transpose_block``).
  For float32 3x3 kernels at stride 1, dilation 1, when Og
  and Wo are whole vectors and Cg >= 8; else v5. The table below has its effect.

Measured by ``python -m benchmarks ops`` (fwd+bwd = forward + grad_input +
grad_weight + grad_bias through ``minseg.functional``; % of peak against the
FP32 peak the benchmark measures on the same machine; ``cpu`` = the defaults:
forward and grad_input v5, grad_weight v6; ``vK`` = every function at version K)::

    case (2026-11-27 16:35 UTC, 2 cores, Xeon    | ms    | GFLOP/s | % of peak | x torch
    AVX-512, peak 387 GFLOP/s measured, 2 threads)|      |         |           |
    conv2d 3x3 fwd+bwd 8x32x64x64->32  v1        | 389.2 |   4.7   |   1.2     | 45.1
    conv2d 3x3 fwd+bwd 8x32x64x64->32  v2        |  20.0 |  90.5   |  23.4     |  2.32
    conv2d 3x3 fwd+bwd 8x32x64x64->32  v3        |   9.7 | 187     |  48.4     |  1.12
    conv2d 3x3 fwd+bwd 8x32x64x64->32  v4        |  21.3 |  85.2   |  22.0     |  2.46
    conv2d 3x3 fwd+bwd 8x32x64x64->32  v5        |   7.1 | 253     |  65.5     |  0.83
    conv2d 3x3 fwd+bwd 8x32x64x64->32  cpu (v6)  |   6.7 | 270     |  69.8     |  0.78
    conv2d 3x3 fwd+bwd 8x64x32x32->64  v1        | 365.6 |   5.0   |   1.3     | 51.1
    conv2d 3x3 fwd+bwd 8x64x32x32->64  v2        |  14.1 | 128     |  33.1     |  1.98
    conv2d 3x3 fwd+bwd 8x64x32x32->64  v3        |  10.1 | 179     |  46.4     |  1.41
    conv2d 3x3 fwd+bwd 8x64x32x32->64  v4        |  21.8 |  83.0   |  21.5     |  3.05
    conv2d 3x3 fwd+bwd 8x64x32x32->64  v5        |   7.1 | 256     |  66.2     |  0.99
    conv2d 3x3 fwd+bwd 8x64x32x32->64  cpu (v6)  |   6.4 | 284     |  73.5     |  0.89
    (torch 2.13 oneDNN: 8.6 and 7.2 ms, 54-66% of the peak; medians of 20; benchmarks/RESULTS.md,
    which also has every conv layer of the benchmark U-Net: ``ops --layers``)

v5 (and v6 for grad_weight) are the defaults: v5 is 1.36-1.43x faster than v3's BLAS GEMMs on
both shapes, v6's grad_weight takes another 6-10% off the whole fwd+bwd; v4, v5's plan left to
the auto-vectoriser (256-bit registers), is about half of v3. (Earlier the same day v5 ran at
56-63% of the peak: its padded-band copy was a slice assignment per row, now one memcpy.)

The products of v2 and v3 are GEMMs of two kinds.

*Taps* (stride 1: the forward, grad_weight, and grad_input, see below). Pad a
band of rows of one image to ``xb`` (C_in rows of ``R*Wq`` values: R padded
rows of ``Wq = Wo + (kw-1)*dw`` columns) and lay the output out *wide*, with
Wq columns per row of which the last ``(kw-1)*dw`` are garbage. Then every
tap (p, q) of the kernel is one product with a *shifted view* of xb::

    y_wide[o, ii*Wq + j] += sum_c w[o, c, p, q] * xb[c, (ii + p*dh)*Wq + j + q*dw]
    (Og x Cg) @ (Cg x rows*Wq): the operand's rows start at c*R*Wq + p*dh*Wq + q*dw, stride R*Wq

so no column matrix is built at all. grad_weight is the same product the
other way round, ``gw[:, :, p, q] += gy_wide @ view^T``, with zeros in gy's
garbage columns.

*im2col* (any stride). Every receptive field becomes a column. For one image
and a band of output rows ``[i0, i1)``::

    cols[(c, p, q), (i - i0)*Wo + j] = xp[c, i*sh + p*dh, j*sw + q*dw]      (C_in*kh*kw rows)

    forward      y[n, g][:, band]  = W[g] @ cols[g]              (Og x K) @ (K x band)
    grad_weight  gw[g]            += gy[n, g][:, band] @ cols[g]^T
    grad_input   dcols[g]          = W[g]^T @ gy[n, g][:, band], then col2im adds dcols into gx

where ``cols[g]`` is rows ``g*K .. (g+1)*K`` (K = Cg*kh*kw). It copies x kh*kw
times, which the taps avoid; strided convolutions cannot use taps because a
view with stride sw > 1 along a row is not a BLAS operand.

grad_input at stride 1 is a forward: ``gx[c, r, s] = sum_{o,p,q} w[o, c, p, q] *
gy[o, r + pt - p*dh, s + pl - q*dw]`` is the convolution of gy with the kernel
flipped in (p, q) and its channel axes swapped, padded by ``(kh-1)*dh - pt``
on top and ``(kw-1)*dw - pl`` on the left (a negative pad crops), with gx's
size as output size. Other strides use col2im, im2col's adjoint (the same
index map with ``+=`` in the other direction).

Optimisations of v2 and v3:

* One parallel region per call. A *work item* is one (image, band of output
  rows); ``prange`` gives each Numba thread a contiguous run of items (an
  image can be split between two threads), and the thread pads or im2cols the
  item and multiplies it itself with a **single-threaded** BLAS GEMM, so the
  copies run on every core and no core idles between them and the products.
  col2im's items are whole images, because bands of one image add into
  overlapping rows of gx.
* ``_gemm`` calls SciPy's BLAS (the one ``np.dot`` uses in ``@njit`` code,
  through Numba's binding) row-major with explicit leading dimensions, so it
  reads the shifted views and writes strided bands in place; grad_weight
  accumulates (beta = 1) into one partial sum per thread, added at the end
  in a fixed order (results do not depend on scheduling).
* While a kernel runs, that OpenBLAS is set to one thread (``_one_blas_thread``):
  a multi-threaded BLAS call nested in the parallel region fights the other
  threads for the cores (several times slower when this was tried, and
  OpenBLAS warns that it may hang). When the BLAS is not an OpenBLAS this
  module can find, the work items run on one Numba thread and the BLAS keeps
  its own threads. (An earlier design alternated a serial im2col with NumPy's
  multi-threaded GEMM: BLAS's threads spin for a while after each call, so the
  copies could not be parallelised; it was slower than this one.)
* Bands: a band's buffers (``_TAPS_BAND_BYTES``, chosen by trial; for the
  8x32x64x64 case that is 192 KiB / ((32 + 32) channels * 66 columns * 4 bytes)
  = 11 rows; ``_BAND_BYTES`` of im2col columns, half of a 2 MB L2, assumed) stay in the
  core's cache between the copy and the GEMMs that read it. Each thread's
  buffers are rows of a workspace kept between calls (``_WORKSPACE``), so a
  call does not pay fresh page faults for them; it is never returned, every
  output is a fresh array. (The shared buffer makes these functions unsafe to
  call from several Python threads at once.)
* The copies never materialise more padding than a band needs: each row
  computes once which columns fall inside the image, zero-fills the rest and
  copies the inside (contiguously when the stride is 1, which LLVM vectorises).

The first call of each kernel compiles it (``cache=True`` stores the machine
code in ``__pycache__``, so later processes load it instead).
"""
from __future__ import annotations

import contextlib
import ctypes
import os

import numba
import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload
from numba.np.linalg import _BLAS, ensure_blas, get_blas_kind

from kernels.conv2d.microkernels import VECTOR_BYTES, copy_values, tile_dots, tile_outer, tile_product, transpose_block
from kernels.conv2d.microkernels import lanes as lanes_of
from kernels.memory import empty_aligned, given
from kernels.shapes import conv_output_size

__all__ = ["conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight", "conv2d_grad_bias"]

_BAND_BYTES = 1 << 20  # one thread's band of im2col columns: half of an (assumed) 2 MB L2, the rest for W and the output
_TAPS_BAND_BYTES = 192 << 10  # one thread's band of padded input + wide output rows at stride 1 (chosen by trial)
_DOTS_VECTORS = 64  # v5 grad_weight's dot-product length (vectors) when gy is read in place: 4 gy + 5 x rows of it fill ~36 KB of L1
_WORKSPACE: dict[str, np.ndarray] = {}
_N, _T = ord("n"), ord("t")  # BLAS's transpose flags


def _workspace(size: int, dtype) -> np.ndarray:
    """A reusable flat scratch array of ``size`` elements (contents undefined).

    One buffer per dtype, grown to the largest request: every layer of a network
    reuses the same (already mapped) pages. Only one call uses it at a time: each
    kernel call takes it and is done with it before returning.
    """
    key = np.dtype(dtype).str
    buf = _WORKSPACE.get(key)
    if buf is None or buf.size < size:
        buf = _WORKSPACE[key] = np.empty(size, dtype)
    return buf[:size]


def _gemm(ta, tb, m, n, k, a, a0, lda, b, b0, ldb, beta, c, c0, ldc):
    """Row-major ``C = op(A) @ op(B) + beta*C`` on flat arrays (compiled only, see the overload below).

    A starts at ``a[a0]`` with row stride ``lda`` (likewise B, C); op(A) is A, or
    A^T when ``ta == _T``; op(A) is (m, k), op(B) is (k, n), C is (m, n).
    """
    raise TypeError("_gemm is only callable from Numba-compiled code")


@overload(_gemm)
def _gemm_overload(ta, tb, m, n, k, a, a0, lda, b, b0, ldb, beta, c, c0, ldc):
    xxgemm = _BLAS().numba_xxgemm(a.dtype)  # Fortran ?gemm from scipy.linalg.cython_blas
    kind = ord(get_blas_kind(a.dtype))
    dtype = a.dtype

    def impl(ta, tb, m, n, k, a, a0, lda, b, b0, ldb, beta, c, c0, ldc):
        # BLAS is column-major: a row-major (m, n) C is a column-major (n, m) C^T = op(B)^T op(A)^T,
        # so swap the operands and keep each one's flag and leading dimension.
        scalars = np.empty(2, dtype)
        scalars[0], scalars[1] = 1, beta
        status = xxgemm(kind, tb, ta, n, m, k, scalars[0:].ctypes, b[b0:].ctypes, ldb,
                        a[a0:].ctypes, lda, scalars[1:].ctypes, c[c0:].ctypes, ldc)
        if status != 0:
            raise RuntimeError("BLAS gemm failed")

    return impl


@njit(cache=True, inline="always")
def _inside(out_size, in_size, offset, step):
    """[lo, hi): the output positions o with 0 <= o*step + offset < in_size (lo <= hi)."""
    lo = 0 if offset >= 0 else (-offset + step - 1) // step
    last = in_size - 1 - offset  # o*step <= last
    hi = 0 if last < 0 else last // step + 1
    lo = min(lo, out_size)
    return lo, max(lo, min(hi, out_size))


@njit(cache=True, inline="always")
def _share(t, nt, total):
    """Thread t's contiguous run [lo, hi) of ``total`` work items split evenly over nt threads."""
    return t * total // nt, (t + 1) * total // nt


@njit(cache=True)
def _im2col(x, cols, i0, kh, kw, sh, sw, pt, pl, dh, dw, wo):
    """cols[(c, p, q), (i - i0)*Wo + j] = x[c, i*sh + p*dh - pt, j*sw + q*dw - pl], 0 outside x."""
    c_in, h, w = x.shape
    rows = cols.shape[1] // wo
    for c in range(c_in):
        for p in range(kh):
            for q in range(kw):
                r = (c * kh + p) * kw + q
                off = q * dw - pl
                j0, j1 = _inside(wo, w, off, sw)
                for ii in range(rows):
                    xi = (i0 + ii) * sh + p * dh - pt
                    base = ii * wo
                    if xi < 0 or xi >= h:
                        for j in range(wo):
                            cols[r, base + j] = 0
                        continue
                    for j in range(j0):
                        cols[r, base + j] = 0
                    for j in range(j1, wo):
                        cols[r, base + j] = 0
                    if sw == 1:
                        for j in range(j0, j1):
                            cols[r, base + j] = x[c, xi, j + off]
                    else:
                        for j in range(j0, j1):
                            cols[r, base + j] = x[c, xi, j * sw + off]


@njit(cache=True)
def _col2im(cols, gx, i0, kh, kw, sh, sw, pt, pl, dh, dw, wo):
    """gx[c, i*sh + p*dh - pt, j*sw + q*dw - pl] += cols[(c, p, q), (i - i0)*Wo + j] (the adjoint of _im2col)."""
    c_in, h, w = gx.shape
    rows = cols.shape[1] // wo
    for c in range(c_in):
        for p in range(kh):
            for q in range(kw):
                r = (c * kh + p) * kw + q
                off = q * dw - pl
                j0, j1 = _inside(wo, w, off, sw)
                for ii in range(rows):
                    xi = (i0 + ii) * sh + p * dh - pt
                    if xi < 0 or xi >= h:
                        continue
                    base = ii * wo
                    if sw == 1:
                        for j in range(j0, j1):
                            gx[c, xi, j + off] += cols[r, base + j]
                    else:
                        for j in range(j0, j1):
                            gx[c, xi, j * sw + off] += cols[r, base + j]


@njit(parallel=True, cache=True)
def _forward_im2col_kernel(x, w, b, y, ws, step, kh, kw, sh, sw, pt, pl, dh, dw, groups):
    """y[i, g][:, band] = w[g] @ im2col(x[i])[g] (+ b; ``b.size == 0``: no bias); bands of ``step`` rows of y."""
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    og, kg = c_out // groups, c_in // groups * kh * kw
    bands = (ho + step - 1) // step
    wf, yf = w.reshape(w.size), y.reshape(y.size)
    nt = ws.shape[0]
    for t in prange(nt):
        lo, hi = _share(t, nt, n * bands)
        for item in range(lo, hi):
            i, i0 = item // bands, item % bands * step
            npix = (min(i0 + step, ho) - i0) * wo
            cols = ws[t, : groups * kg * npix]
            _im2col(x[i], cols.reshape((groups * kg, npix)), i0, kh, kw, sh, sw, pt, pl, dh, dw, wo)
            for g in range(groups):
                y0 = ((i * c_out + g * og) * ho + i0) * wo
                _gemm(_N, _N, og, npix, kg, wf, g * og * kg, kg, cols, g * kg * npix, npix, 0.0, yf, y0, ho * wo)
            if b.size:  # while the band is in cache
                for o in range(c_out):
                    y0 = ((i * c_out + o) * ho + i0) * wo
                    yf[y0 : y0 + npix] += b[o]


@njit(cache=True)
def _pad_band(x, xb, r0, rows, pl, wq):
    """xb[c, r, s] = x[c, r0 + r, s - pl], 0 outside x: ``rows`` rows of the zero-padded (or cropped) image.

    Whatever of xb lies past those C_in*rows*Wq values is zeroed too (the taps' slack).
    """
    c_in, h, w = x.shape
    s0 = min(max(0, pl), wq)  # xb[.., s] for s in [s0, s1) comes from x; the rest is padding
    s1 = max(s0, min(wq, pl + w))
    # A row's values from x with one memcpy (``copy_values``): rows are tens of values, and a
    # slice assignment's views, or a value-at-a-time loop, cost 3-4x the copy (measured).
    rows_copy = x.strides[2] == x.itemsize  # x's rows are contiguous (always, but for a strided view)
    for c in range(c_in):
        for r in range(rows):
            base = (c * rows + r) * wq
            xi = r0 + r
            if xi < 0 or xi >= h:
                for s in range(wq):
                    xb[base + s] = 0
                continue
            for s in range(s0):  # the padding: a value or two
                xb[base + s] = 0
            for s in range(s1, wq):
                xb[base + s] = 0
            if rows_copy:
                src = np.intp(x.ctypes.data) + c * x.strides[0] + xi * x.strides[1] + (s0 - pl) * x.itemsize
                copy_values(xb, _at(xb, base + s0), src, s1 - s0)
            else:
                xb[base + s0 : base + s1] = x[c, xi, s0 - pl : s1 - pl]
    for s in range(c_in * rows * wq, xb.size):
        xb[s] = 0


@njit(cache=True, inline="always")
def _taps_item(item, bands, step, ho, kh, dh):
    """Work item ``item`` of the stride-1 kernels: (image, first output row i0, rows in the band,
    padded input rows it reads = rows + (kh-1)*dh); bands of ``step`` rows, the last one ragged."""
    i, i0 = item // bands, item % bands * step
    rows = min(i0 + step, ho) - i0
    return i, i0, rows, rows + (kh - 1) * dh


@njit(parallel=True, cache=True)
def _forward_taps_kernel(x, wt, b, y, ws, step, kh, kw, pt, pl, dh, dw, groups):
    """Stride 1: y[i, g][:, band] = sum over taps (p, q) of wt[p, q, g] @ (shifted band of padded x[i])[g] (+ b).

    With the band's padded rows xb (R = rows + (kh-1)*dh of Wq = Wo + (kw-1)*dw columns) and the
    output laid out "wide" (Wq columns per row, the last (kw-1)*dw of them garbage), tap (p, q)'s
    operand is xb shifted by p*dh*Wq + q*dw: C_in rows of stride R*Wq, no im2col copy.
    """
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    og, cg = c_out // groups, c_in // groups
    wq = wo + (kw - 1) * dw
    rows_max = step + (kh - 1) * dh
    xb_size = c_in * rows_max * wq + (kw - 1) * dw  # the last tap's garbage columns read past the end
    bands = (ho + step - 1) // step
    wf, yf = wt.reshape(wt.size), y.reshape(y.size)
    nt = ws.shape[0]
    for t in prange(nt):
        xb, yw = ws[t, :xb_size], ws[t, xb_size:]
        lo, hi = _share(t, nt, n * bands)
        for item in range(lo, hi):
            i, i0, rows, r_all = _taps_item(item, bands, step, ho, kh, dh)
            npix = rows * wq
            _pad_band(x[i], xb[: c_in * r_all * wq + (kw - 1) * dw], i0 - pt, r_all, pl, wq)
            for p in range(kh):
                for q in range(kw):
                    for g in range(groups):
                        _gemm(_N, _N, og, npix, cg, wf, ((p * kw + q) * c_out + g * og) * cg, cg,
                              xb, g * cg * r_all * wq + p * dh * wq + q * dw, r_all * wq,
                              0.0 if p == 0 and q == 0 else 1.0, yw, g * og * npix, npix)
            for o in range(c_out):  # drop the garbage columns, add the bias while the band is in cache
                bias = b[o] if b.size else yw.dtype.type(0)
                for ii in range(rows):
                    y0, src = ((i * c_out + o) * ho + i0 + ii) * wo, o * npix + ii * wq
                    for j in range(wo):
                        yf[y0 + j] = yw[src + j] + bias


@njit(parallel=True, cache=True)
def _grad_weight_taps_kernel(x, gy, part, ws, step, kh, kw, pt, pl, dh, dw, groups):
    """Stride 1: part[t, p, q, g*Og + o] = thread t's share of the sum over items of gy_wide[i, g] @ view_pq[g]^T.

    The operands are the forward's (see ``_forward_taps_kernel``); gy's band is copied to the wide
    layout with zeros in the garbage columns, so those columns add nothing.
    """
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    og, cg = c_out // groups, c_in // groups
    wq = wo + (kw - 1) * dw
    xb_size = c_in * (step + (kh - 1) * dh) * wq + (kw - 1) * dw
    bands = (ho + step - 1) // step
    pf = part.reshape(part.size)
    nt = ws.shape[0]
    for t in prange(nt):
        xb, gyw = ws[t, :xb_size], ws[t, xb_size:]
        lo, hi = _share(t, nt, n * bands)
        for item in range(lo, hi):
            i, i0, rows, r_all = _taps_item(item, bands, step, ho, kh, dh)
            npix = rows * wq
            _pad_band(x[i], xb[: c_in * r_all * wq + (kw - 1) * dw], i0 - pt, r_all, pl, wq)
            _pad_band(gy[i], gyw[: c_out * npix], i0, rows, 0, wq)
            for p in range(kh):
                for q in range(kw):
                    for g in range(groups):
                        _gemm(_N, _T, og, cg, npix, gyw, g * og * npix, npix,
                              xb, g * cg * r_all * wq + p * dh * wq + q * dw, r_all * wq,
                              1.0, pf, (((t * kh + p) * kw + q) * c_out + g * og) * cg, cg)


@njit(parallel=True, cache=True)
def _grad_weight_im2col_kernel(x, gy, part, ws, step, kh, kw, sh, sw, pt, pl, dh, dw, groups):
    """part[t, g*Og + o] = thread t's share of sum over (image, band) items of gy[i, g][:, band] @ im2col(x[i])[g]^T."""
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    og, kg = c_out // groups, c_in // groups * kh * kw
    bands = (ho + step - 1) // step
    gyf, pf = gy.reshape(gy.size), part.reshape(part.size)
    nt = ws.shape[0]
    for t in prange(nt):
        lo, hi = _share(t, nt, n * bands)
        for item in range(lo, hi):
            i, i0 = item // bands, item % bands * step
            npix = (min(i0 + step, ho) - i0) * wo
            cols = ws[t, : groups * kg * npix]
            _im2col(x[i], cols.reshape((groups * kg, npix)), i0, kh, kw, sh, sw, pt, pl, dh, dw, wo)
            for g in range(groups):
                gy0 = ((i * c_out + g * og) * ho + i0) * wo
                part0 = (t * c_out + g * og) * kg
                _gemm(_N, _T, og, kg, npix, gyf, gy0, ho * wo, cols, g * kg * npix, npix, 1.0, pf, part0, kg)


@njit(parallel=True, cache=True)
def _grad_input_col2im_kernel(gy, w, gx, ws, step, kh, kw, sh, sw, pt, pl, dh, dw, groups):
    """gx[i] += col2im(w[g]^T @ gy[i, g][:, band]) over bands; one work item per image (bands overlap in gx)."""
    n, c_out, ho, wo = gy.shape
    c_in = gx.shape[1]
    og, kg = c_out // groups, c_in // groups * kh * kw
    gyf, wf = gy.reshape(gy.size), w.reshape(w.size)
    nt = ws.shape[0]
    for t in prange(nt):
        lo, hi = _share(t, nt, n)
        for i in range(lo, hi):
            for i0 in range(0, ho, step):
                npix = (min(i0 + step, ho) - i0) * wo
                cols = ws[t, : groups * kg * npix]
                for g in range(groups):
                    gy0 = ((i * c_out + g * og) * ho + i0) * wo
                    _gemm(_T, _N, kg, npix, og, wf, g * og * kg, kg, gyf, gy0, ho * wo, 0.0, cols, g * kg * npix, npix)
                _col2im(cols.reshape((groups * kg, npix)), gx[i], i0, kh, kw, sh, sw, pt, pl, dh, dw, wo)


def _openblas_threads():
    """(get, set) of the thread count of the OpenBLAS behind scipy.linalg.cython_blas, or None.

    That is the BLAS that ``_gemm`` calls. ``dlsym`` on the Cython module's handle also searches
    the libraries it links, so this finds OpenBLAS under its plain names (system or conda
    builds) or under SciPy's wheels' ``scipy_`` prefix.
    """
    ensure_blas()
    import scipy.linalg.cython_blas

    lib = ctypes.CDLL(scipy.linalg.cython_blas.__file__)
    for prefix in ("scipy_openblas", "openblas"):
        get, set_ = getattr(lib, prefix + "_get_num_threads", None), getattr(lib, prefix + "_set_num_threads", None)
        if get is not None and set_ is not None:
            set_.argtypes = (ctypes.c_int,)
            return get, set_
    return None


_OPENBLAS = _openblas_threads()


def _item_threads():
    """How many Numba threads share the work items: all of them when ``_one_blas_thread`` can act, else 1."""
    return 1 if _OPENBLAS is None else numba.get_num_threads()


@contextlib.contextmanager
def _one_blas_thread():
    """OpenBLAS runs single-threaded inside (a no-op when it was not found).

    Each thread's GEMM must be single-threaded: a multi-threaded BLAS call nested in the
    parallel region fights the other threads for the cores (several times slower when this
    was tried, and OpenBLAS warns that it may hang). Without OpenBLAS
    the items run on one Numba thread instead, and the BLAS keeps its own threads.
    """
    if _OPENBLAS is None:
        yield
        return
    get, set_ = _OPENBLAS
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


def _band_rows(k, ho, wo, itemsize):
    """Output rows per band: as many as fit ``_BAND_BYTES`` of k-row columns, at least 1, at most Ho."""
    return max(1, min(ho, _BAND_BYTES // (k * wo * itemsize)))


def _taps_band(c_in, c_out, out_hw, kernel_hw, dilation, itemsize):
    """(rows per band, padded-input buffer size, Wq) of the stride-1 taps kernels: bands as tall as
    ``_TAPS_BAND_BYTES`` allows, evened out.

    A band row needs C_in padded input rows and C_out wide output rows of Wq = Wo + (kw-1)*dw
    values; the input buffer has (kh-1)*dh extra rows and (kw-1)*dw values of slack.
    """
    (kh, kw), (dh, dw) = kernel_hw, dilation
    wq = out_hw[1] + (kw - 1) * dw
    most = max(1, min(out_hw[0], _TAPS_BAND_BYTES // ((c_in + c_out) * wq * itemsize)))
    # as many bands as the budget needs, ceil(Ho / bands) rows each (the last one may be a little
    # shorter): full bands and a short remainder would pay a band's fixed costs -- its (kh-1)*dh
    # extra padded rows, its tables -- for a few rows (32 rows in bands of 16 + 16, not 29 + 3: the
    # U-Net's 16->32 layer at 32x32, 2 threads, took 0.93x the time; interleaved A/B, one run)
    step = -(-out_hw[0] // -(-out_hw[0] // most))
    return step, c_in * (step + (kh - 1) * dh) * wq + (kw - 1) * dw, wq


def _run(kernel, inputs, out, kernel_hw, band_hw, k, stride, padding, dilation, groups):
    """kernel(*inputs, out, ...) with a per-thread workspace for bands of output rows (``band_hw``) of k columns."""
    (kh, kw), (ho, wo) = kernel_hw, band_hw
    step = _band_rows(k, ho, wo, out.dtype.itemsize)
    nt = _item_threads()
    ws = _workspace(nt * k * step * wo, out.dtype).reshape(nt, -1)
    with _one_blas_thread():
        kernel(*inputs, out, ws, step, kh, kw, *stride, padding[0][0], padding[1][0], *dilation, groups)
    return out


def _run_taps(kernel, inputs, out, channels, kernel_hw, out_hw, padding, dilation, groups):
    """kernel(*inputs, out, ...) at stride 1, with a per-thread workspace for a band's padded input and wide output."""
    c_in, c_out = channels
    step, xb_size, wq = _taps_band(c_in, c_out, out_hw, kernel_hw, dilation, out.dtype.itemsize)
    nt = _item_threads()
    ws = _workspace(nt * (xb_size + c_out * step * wq), out.dtype).reshape(nt, -1)
    with _one_blas_thread():
        kernel(*inputs, out, ws, step, *kernel_hw, padding[0][0], padding[1][0], *dilation, groups)
    return out


# ------------------------------------------------------------------ v1: direct loops


@njit(parallel=True, cache=True)
def _forward_direct_kernel(x, w, b, y, sh, sw, pt, pl, dh, dw, groups):
    """y[i, o, r, s] = b[o] + sum_{c, p, q} w[o, c, p, q] * x[i, g*Cg + c, r*sh + p*dh - pt, s*sw + q*dw - pl].

    One output plane (i, o) per iteration; taps that land in the padding are skipped
    (``b.size == 0``: no bias).
    """
    n, _, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    ho, wo = y.shape[2], y.shape[3]
    og = c_out // groups
    for plane in prange(n * c_out):
        i, o = plane // c_out, plane % c_out
        c0 = o // og * cg  # first input channel of o's group
        bias = b[o] if b.size else y.dtype.type(0)
        for r in range(ho):
            for s in range(wo):
                acc = bias
                for c in range(cg):
                    for p in range(kh):
                        xi = r * sh + p * dh - pt
                        if xi < 0 or xi >= h:
                            continue
                        for q in range(kw):
                            xj = s * sw + q * dw - pl
                            if 0 <= xj < wd:
                                acc += w[o, c, p, q] * x[i, c0 + c, xi, xj]
                y[i, o, r, s] = acc


@njit(parallel=True, cache=True)
def _grad_input_direct_kernel(gy, w, gx, sh, sw, pt, pl, dh, dw, groups):
    """gx[i, g*Cg + c, u, v] = sum over o of group g and taps (p, q) of w[o, c, p, q] * gy[i, o, r, s],
    where u = r*sh + p*dh - pt and v = s*sw + q*dw - pl, with (r, s) inside gy.

    The gather form: each input pixel inverts the forward's index map, r = (u + pt - p*dh) / sh,
    for the taps where that is a whole number in [0, Ho). One input plane per iteration: every
    value is written by one iteration, so there are no races.
    """
    n, c_in, h, wd = gx.shape
    c_out, cg, kh, kw = w.shape
    ho, wo = gy.shape[2], gy.shape[3]
    og = c_out // groups
    for plane in prange(n * c_in):
        i, ci = plane // c_in, plane % c_in
        g, c = ci // cg, ci % cg
        for u in range(h):
            for v in range(wd):
                acc = gx.dtype.type(0)
                for p in range(kh):
                    rs = u + pt - p * dh  # = r*sh
                    r = rs // sh
                    if rs < 0 or r * sh != rs or r >= ho:
                        continue
                    for q in range(kw):
                        ss = v + pl - q * dw  # = s*sw
                        s = ss // sw
                        if ss < 0 or s * sw != ss or s >= wo:
                            continue
                        for o in range(g * og, (g + 1) * og):
                            acc += w[o, c, p, q] * gy[i, o, r, s]
                gx[i, ci, u, v] = acc


@njit(parallel=True, cache=True)
def _grad_weight_direct_kernel(x, gy, gw, sh, sw, pt, pl, dh, dw, groups):
    """gw[o, c, p, q] = sum_{i, r, s} gy[i, o, r, s] * x[i, g*Cg + c, r*sh + p*dh - pt, s*sw + q*dw - pl].

    One weight plane (o, c) per iteration, each a sum over all N*Ho*Wo outputs per tap.
    """
    n, _, h, wd = x.shape
    c_out, cg, kh, kw = gw.shape
    ho, wo = gy.shape[2], gy.shape[3]
    og = c_out // groups
    for plane in prange(c_out * cg):
        o, c = plane // cg, plane % cg
        ci = o // og * cg + c
        for p in range(kh):
            for q in range(kw):
                acc = gw.dtype.type(0)
                for i in range(n):
                    for r in range(ho):
                        xi = r * sh + p * dh - pt
                        if xi < 0 or xi >= h:
                            continue
                        for s in range(wo):
                            xj = s * sw + q * dw - pl
                            if 0 <= xj < wd:
                                acc += gy[i, o, r, s] * x[i, ci, xi, xj]
                gw[o, c, p, q] = acc


def _forward_v1(x, w, b, stride, padding, dilation, groups):
    y = np.empty((x.shape[0], w.shape[0], *_out_hw(x, w, stride, padding, dilation)), x.dtype)
    b = given(b, x.dtype)
    _forward_direct_kernel(x, w, b, y, *stride, padding[0][0], padding[1][0], *dilation, groups)
    return y


def _grad_input_v1(gy, w, x_shape, stride, padding, dilation, groups):
    gx = np.empty(x_shape, gy.dtype)
    _grad_input_direct_kernel(gy, w, gx, *stride, padding[0][0], padding[1][0], *dilation, groups)
    return gx


def _grad_weight_v1(x, gy, w_shape, stride, padding, dilation, groups):
    gw = np.empty(w_shape, x.dtype)
    _grad_weight_direct_kernel(x, gy, gw, *stride, padding[0][0], padding[1][0], *dilation, groups)
    return gw


# ------------------------------------------------------- v2: im2col + GEMM, v3: taps


def _out_hw(x, w, stride, padding, dilation):
    return tuple(conv_output_size(x.shape[2 + a], sum(padding[a]), dilation[a], w.shape[2 + a], stride[a]) for a in (0, 1))


def _forward_im2col(x, w, b, out_hw, stride, padding, dilation, groups):
    """Any stride: y[i, g][:, band] = w[g] @ im2col(x[i])[g] per (image, band) item."""
    y = np.empty((x.shape[0], w.shape[0], *out_hw), x.dtype)
    b = given(b, x.dtype)
    k = x.shape[1] * w.shape[2] * w.shape[3]
    return _run(_forward_im2col_kernel, (x, w, b), y, w.shape[2:], out_hw, k, stride, padding, dilation, groups)


def _forward_taps(x, w, b, out_hw, padding, dilation, groups):
    """Stride 1: y[i, g][:, band] = sum over taps of w[g][:, :, p, q] @ (shifted band of padded x[i])[g]."""
    y = np.empty((x.shape[0], w.shape[0], *out_hw), x.dtype)
    b = given(b, x.dtype)
    wt = np.ascontiguousarray(w.transpose(2, 3, 0, 1))  # (kh, kw, C_out, Cg): one (C_out, Cg) matrix per tap
    channels = (x.shape[1], w.shape[0])
    return _run_taps(_forward_taps_kernel, (x, wt, b), y, channels, w.shape[2:], out_hw, padding, dilation, groups)


def _forward_v2(x, w, b, stride, padding, dilation, groups):
    return _forward_im2col(x, w, b, _out_hw(x, w, stride, padding, dilation), stride, padding, dilation, groups)


def _stride_one_version(stride_one_forward, flips=False):
    """(forward, grad_input) of a version whose own kernel ``stride_one_forward`` serves stride 1.

    Other strides go through im2col / col2im (v2). At stride 1 grad_input is the same forward
    of gy with the flipped, channel-swapped kernel (``_grad_input_flipped``).
    """

    def forward(x, w, b, stride, padding, dilation, groups):
        out_hw = _out_hw(x, w, stride, padding, dilation)
        if stride != (1, 1):
            return _forward_im2col(x, w, b, out_hw, stride, padding, dilation, groups)
        return stride_one_forward(x, w, b, out_hw, padding, dilation, groups)

    def grad_input(gy, w, x_shape, stride, padding, dilation, groups):
        if stride == (1, 1):
            return _grad_input_flipped(gy, w, x_shape, padding, dilation, groups, stride_one_forward, flips)
        return _grad_input_col2im(gy, w, x_shape, stride, padding, dilation, groups)

    return forward, grad_input


_forward_v3, _grad_input_v3 = _stride_one_version(_forward_taps)


def _flipped_padding(kernel_hw, dilation, padding):
    """grad_input's padding as a forward of gy: (k-1)*d - pad_top (or left) before, 0 after (negative: a crop)."""
    return tuple(((k - 1) * d - p[0], 0) for k, d, p in zip(kernel_hw, dilation, padding))


def _grad_input_flipped(gy, w, x_shape, padding, dilation, groups, forward, flips=False):
    """Stride 1 only: gx = conv2d(gy, w_flip) by ``forward`` (``_forward_taps``, ``_forward_tiles`` or
    ``_forward_vector``), w_flip[g*Cg + c, o, p, q] = w[g*Og + o, c, kh-1-p, kw-1-q]. ``flips``: the
    forward takes w itself and flips it as it packs it (``flip=True``)."""
    c_out, cg, kh, kw = w.shape
    og = c_out // groups
    pad = _flipped_padding((kh, kw), dilation, padding)
    if flips:
        return forward(gy, w, None, tuple(x_shape[2:]), pad, dilation, groups, flip=True)
    w_flip = w.reshape(groups, og, cg, kh, kw).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
    w_flip = np.ascontiguousarray(w_flip).reshape(groups * cg, og, kh, kw)
    return forward(gy, w_flip, None, tuple(x_shape[2:]), pad, dilation, groups)


def _grad_input_col2im(gy, w, x_shape, stride, padding, dilation, groups):
    """Any stride: gx = col2im(W^T @ gy), one image per work item."""
    kh, kw = w.shape[2:]
    gx = np.zeros(x_shape, gy.dtype)
    k = x_shape[1] * kh * kw
    return _run(_grad_input_col2im_kernel, (gy, w), gx, (kh, kw), gy.shape[2:], k, stride, padding, dilation, groups)


def _grad_weight_im2col(x, gy, w_shape, stride, padding, dilation, groups):
    """Any stride: gw = sum over (image, band) items of gy @ im2col(x)^T, in per-thread partial sums."""
    _, c_out, ho, wo = gy.shape
    _, cg, kh, kw = w_shape
    part = np.zeros((_item_threads(), c_out, cg * kh * kw), x.dtype)
    k = x.shape[1] * kh * kw
    _run(_grad_weight_im2col_kernel, (x, gy), part, (kh, kw), (ho, wo), k, stride, padding, dilation, groups)
    return part.sum(axis=0).reshape(w_shape)


def _grad_weight_v3(x, gy, w_shape, stride, padding, dilation, groups):
    """Stride 1: gw[:, :, p, q] = sum over items of gy_wide @ (tap (p, q)'s view)^T; else im2col (v2)."""
    if stride != (1, 1):
        return _grad_weight_im2col(x, gy, w_shape, stride, padding, dilation, groups)
    c_out = gy.shape[1]
    _, cg, kh, kw = w_shape
    part = np.zeros((_item_threads(), kh, kw, c_out, cg), x.dtype)
    channels = (x.shape[1], c_out)
    _run_taps(_grad_weight_taps_kernel, (x, gy), part, channels, (kh, kw), gy.shape[2:], padding, dilation, groups)
    return np.ascontiguousarray(part.sum(axis=0).transpose(2, 3, 0, 1))


# --------------------------------------------------- v4: register-blocked micro-kernel

# A micro-tile: MR output channels x NR output pixels, accumulated in registers. A row of NR is two
# vector registers: LLVM vectorises with 256-bit registers on AVX-512 CPUs (their "prefer-256-bit"
# tuning) unless NUMBA_CPU_FEATURES removes that flag, and then 512-bit ones; 6 x 2 accumulators,
# 2 input vectors and the broadcast weights fit the 32 vector registers without spills either way.
MR = 6
NR = 32 if "-prefer-256-bit" in os.environ.get("NUMBA_CPU_FEATURES", "") else 16
# grad_weight's micro-tile: MW output channels x KT weights (taps), each a dot product over the
# pixels accumulated in LANES-wide partial sums (one vector register in float32).
MW, KT, LANES = 4, 3, NR // 2


@intrinsic
def _stack_array(typingctx, like, size):
    """A pointer to ``size`` (a constant) values of ``like``'s dtype on the stack (an LLVM ``alloca``).

    Numba has no vector types, and an array from ``np.empty`` lives on the heap, where every
    ``+=`` is a load and a store. A stack array indexed only by a loop that LLVM vectorises
    is promoted to registers: a row of accumulators stays in vector registers for the
    whole reduction.
    """
    if not isinstance(size, types.IntegerLiteral):
        raise TypingError("_stack_array: size must be a compile-time constant")
    sig = types.CPointer(like.dtype)(like, size)

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(like.dtype), size=size.literal_value)

    return sig, codegen


@njit(cache=True, fastmath={"contract"})
def _micro_tile(xb, x0, c_stride, row_step, dw, cg, kh, kw, wg, o0, tile):
    """tile[a, b] = sum_{c, p, q} wg[(c*kh + p)*kw + q, o0 + a] * xb[x0 + c*c_stride + p*row_step + q*dw + b].

    a < MR, b < NR: one MR x NR block of the taps product (``_forward_taps_kernel``) with every
    tap of the kernel in one reduction of K = Cg*kh*kw steps. Each step loads NR consecutive
    inputs (a row of the B panel, read in place from the padded band) and MR weights (packed
    contiguously), and does MR*NR multiply-adds (``contract``: fused FMAs) into accumulators
    that stay in registers: MR*NR FMAs per NR + MR loads, where a GEMM row at a time does one
    FMA per load. The MR = 6 rows are written out (r0..r5) because each must be its own stack
    array (``_stack_array``) for LLVM to keep it in registers.
    """
    r0, r1, r2 = carray(_stack_array(xb, NR), NR), carray(_stack_array(xb, NR), NR), carray(_stack_array(xb, NR), NR)
    r3, r4, r5 = carray(_stack_array(xb, NR), NR), carray(_stack_array(xb, NR), NR), carray(_stack_array(xb, NR), NR)
    for b in range(NR):
        r0[b] = r1[b] = r2[b] = r3[b] = r4[b] = r5[b] = 0
    k = 0
    for c in range(cg):
        for p in range(kh):
            row = x0 + c * c_stride + p * row_step
            for q in range(kw):
                xs = xb[row + q * dw : row + q * dw + NR]
                w = wg[k, o0 : o0 + MR]
                w0, w1, w2, w3, w4, w5 = w[0], w[1], w[2], w[3], w[4], w[5]
                for b in range(NR):
                    v = xs[b]
                    r0[b] += w0 * v
                    r1[b] += w1 * v
                    r2[b] += w2 * v
                    r3[b] += w3 * v
                    r4[b] += w4 * v
                    r5[b] += w5 * v
                k += 1
    for b in range(NR):
        tile[0, b], tile[1, b], tile[2, b] = r0[b], r1[b], r2[b]
        tile[3, b], tile[4, b], tile[5, b] = r3[b], r4[b], r5[b]


@njit(parallel=True, cache=True)
def _forward_tiles_kernel(x, wp, b, y, ws, step, kh, kw, pt, pl, dh, dw, groups):
    """Stride 1: the taps product of ``_forward_taps_kernel`` computed MR x NR micro-tile by micro-tile.

    Same work items, padded bands and wide pixel index m = ii*Wq + j as the taps kernel, but
    instead of kh*kw BLAS calls that each stream the whole band, ``_micro_tile`` sums all
    K = Cg*kh*kw terms of one block of MR channels x NR wide pixels in registers, and the
    block goes straight into y (garbage columns j >= Wo dropped, bias added): no wide output
    buffer. For each strip of NR pixels (K x NR inputs: stays in L1) it walks the channel
    blocks; wp[g] is (K, Og rounded up to MR), zero in the padded channels.
    """
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    og, cg = c_out // groups, c_in // groups
    wq = wo + (kw - 1) * dw
    xb_size = c_in * (step + (kh - 1) * dh) * wq + (kw - 1) * dw + NR  # the last strip reads NR past the band
    bands = (ho + step - 1) // step
    nt = ws.shape[0]
    for t in prange(nt):
        xb, tile = ws[t, :xb_size], ws[t, xb_size : xb_size + MR * NR].reshape((MR, NR))
        lo, hi = _share(t, nt, n * bands)
        for item in range(lo, hi):
            i, i0, rows, r_all = _taps_item(item, bands, step, ho, kh, dh)
            npix = rows * wq
            _pad_band(x[i], xb[: c_in * r_all * wq + (kw - 1) * dw + NR], i0 - pt, r_all, pl, wq)
            for g in range(groups):
                for m0 in range(0, npix, NR):
                    for o0 in range(0, og, MR):
                        _micro_tile(xb, g * cg * r_all * wq + m0, r_all * wq, dh * wq, dw, cg, kh, kw, wp[g], o0, tile)
                        for a in range(min(MR, og - o0)):
                            o = g * og + o0 + a
                            bias = b[o] if b.size else y.dtype.type(0)
                            for col in range(min(NR, npix - m0)):
                                ii, j = divmod(m0 + col, wq)
                                if j < wo:
                                    y[i, o, i0 + ii, j] = tile[a, col] + bias


def _forward_tiles(x, w, b, out_hw, padding, dilation, groups):
    """Stride 1: y by register-blocked micro-tiles over padded bands (``_forward_tiles_kernel``)."""
    y = np.empty((x.shape[0], w.shape[0], *out_hw), x.dtype)
    b = given(b, x.dtype)
    c_out, cg, kh, kw = w.shape
    og = c_out // groups
    wp = np.zeros((groups, cg * kh * kw, -(-og // MR) * MR), w.dtype)  # wp[g, (c, p, q), o], Og rounded up to MR
    wp[:, :, :og] = w.reshape(groups, og, cg * kh * kw).transpose(0, 2, 1)
    step, xb_size, _ = _taps_band(x.shape[1], c_out, out_hw, (kh, kw), dilation, x.dtype.itemsize)
    nt = _item_threads()
    ws = _workspace(nt * (xb_size + NR + MR * NR), x.dtype).reshape(nt, -1)
    _forward_tiles_kernel(x, wp, b, y, ws, step, kh, kw, padding[0][0], padding[1][0], *dilation, groups)
    return y


_forward_v4, _grad_input_v4 = _stride_one_version(_forward_tiles)


@njit(cache=True, fastmath={"contract"})
def _micro_dots(gyw, y0, y1, y2, y3, xb, x0, x1, x2, length, tile):
    """tile[a, t] = sum_{m < length} gyw[y_a + m] * xb[x_t + m] for a < MW (= 4), t < KT (= 3).

    grad_weight's micro-kernel: MW*KT dot products over the pixels at once. Each step loads
    LANES values of MW gy rows and KT shifted x rows and does MW*KT vector FMAs into
    accumulators that stay in registers (``_stack_array``); one horizontal sum per
    accumulator at the end. The pixels past the last whole LANES go one by one.
    """
    r00, r01, r02 = carray(_stack_array(xb, LANES), LANES), carray(_stack_array(xb, LANES), LANES), carray(_stack_array(xb, LANES), LANES)
    r10, r11, r12 = carray(_stack_array(xb, LANES), LANES), carray(_stack_array(xb, LANES), LANES), carray(_stack_array(xb, LANES), LANES)
    r20, r21, r22 = carray(_stack_array(xb, LANES), LANES), carray(_stack_array(xb, LANES), LANES), carray(_stack_array(xb, LANES), LANES)
    r30, r31, r32 = carray(_stack_array(xb, LANES), LANES), carray(_stack_array(xb, LANES), LANES), carray(_stack_array(xb, LANES), LANES)
    for b in range(LANES):
        r00[b] = r01[b] = r02[b] = r10[b] = r11[b] = r12[b] = 0
        r20[b] = r21[b] = r22[b] = r30[b] = r31[b] = r32[b] = 0
    full = length - length % LANES
    for m0 in range(0, full, LANES):
        g0, g1 = gyw[y0 + m0 : y0 + m0 + LANES], gyw[y1 + m0 : y1 + m0 + LANES]
        g2, g3 = gyw[y2 + m0 : y2 + m0 + LANES], gyw[y3 + m0 : y3 + m0 + LANES]
        v0, v1, v2 = xb[x0 + m0 : x0 + m0 + LANES], xb[x1 + m0 : x1 + m0 + LANES], xb[x2 + m0 : x2 + m0 + LANES]
        for b in range(LANES):
            r00[b] += g0[b] * v0[b]
            r01[b] += g0[b] * v1[b]
            r02[b] += g0[b] * v2[b]
            r10[b] += g1[b] * v0[b]
            r11[b] += g1[b] * v1[b]
            r12[b] += g1[b] * v2[b]
            r20[b] += g2[b] * v0[b]
            r21[b] += g2[b] * v1[b]
            r22[b] += g2[b] * v2[b]
            r30[b] += g3[b] * v0[b]
            r31[b] += g3[b] * v1[b]
            r32[b] += g3[b] * v2[b]
    for m in range(full, length):
        b = m - full
        r00[b] += gyw[y0 + m] * xb[x0 + m]
        r01[b] += gyw[y0 + m] * xb[x1 + m]
        r02[b] += gyw[y0 + m] * xb[x2 + m]
        r10[b] += gyw[y1 + m] * xb[x0 + m]
        r11[b] += gyw[y1 + m] * xb[x1 + m]
        r12[b] += gyw[y1 + m] * xb[x2 + m]
        r20[b] += gyw[y2 + m] * xb[x0 + m]
        r21[b] += gyw[y2 + m] * xb[x1 + m]
        r22[b] += gyw[y2 + m] * xb[x2 + m]
        r30[b] += gyw[y3 + m] * xb[x0 + m]
        r31[b] += gyw[y3 + m] * xb[x1 + m]
        r32[b] += gyw[y3 + m] * xb[x2 + m]
    tile[:, :] = 0
    for b in range(LANES):
        tile[0, 0], tile[0, 1], tile[0, 2] = tile[0, 0] + r00[b], tile[0, 1] + r01[b], tile[0, 2] + r02[b]
        tile[1, 0], tile[1, 1], tile[1, 2] = tile[1, 0] + r10[b], tile[1, 1] + r11[b], tile[1, 2] + r12[b]
        tile[2, 0], tile[2, 1], tile[2, 2] = tile[2, 0] + r20[b], tile[2, 1] + r21[b], tile[2, 2] + r22[b]
        tile[3, 0], tile[3, 1], tile[3, 2] = tile[3, 0] + r30[b], tile[3, 1] + r31[b], tile[3, 2] + r32[b]


@njit(cache=True, inline="always")
def _tap_offset(k, kh, kw, base, c_stride, row_step, dw):
    """Where weight k = (c*kh + p)*kw + q's view of the padded band starts: base + c*c_stride + p*row_step + q*dw."""
    c, pq = divmod(k, kh * kw)
    p, q = divmod(pq, kw)
    return base + c * c_stride + p * row_step + q * dw


@njit(parallel=True, cache=True)
def _grad_weight_tiles_kernel(x, gy, part, ws, step, kh, kw, pt, pl, dh, dw, groups):
    """Stride 1: part[t, o, k] = thread t's share of gw[o, k] = sum over items of gy_wide[i, o] . view_k,
    MW channels x KT weights at a time (``_micro_dots``).

    The operands are ``_grad_weight_taps_kernel``'s (padded x band, gy band in the wide layout
    with zeros in the garbage columns); each weight k = (c, p, q) is the dot product of a gy row
    with the band shifted to tap (p, q) of channel c. Channels past a group's last, and weights
    past the last, repeat the last one and their sums are dropped.
    """
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    og, cg = c_out // groups, c_in // groups
    kk = cg * kh * kw
    wq = wo + (kw - 1) * dw
    xb_size = c_in * (step + (kh - 1) * dh) * wq + (kw - 1) * dw
    gy_size = c_out * step * wq
    bands = (ho + step - 1) // step
    nt = ws.shape[0]
    for t in prange(nt):
        xb, gyw = ws[t, :xb_size], ws[t, xb_size : xb_size + gy_size]
        tile = ws[t, xb_size + gy_size : xb_size + gy_size + MW * KT].reshape((MW, KT))
        lo, hi = _share(t, nt, n * bands)
        for item in range(lo, hi):
            i, i0, rows, r_all = _taps_item(item, bands, step, ho, kh, dh)
            npix = rows * wq
            _pad_band(x[i], xb[: c_in * r_all * wq + (kw - 1) * dw], i0 - pt, r_all, pl, wq)
            _pad_band(gy[i], gyw[: c_out * npix], i0, rows, 0, wq)
            for g in range(groups):
                base = g * cg * r_all * wq
                for o0 in range(0, og, MW):
                    last = og - 1
                    y0, y1 = (g * og + min(o0, last)) * npix, (g * og + min(o0 + 1, last)) * npix
                    y2, y3 = (g * og + min(o0 + 2, last)) * npix, (g * og + min(o0 + 3, last)) * npix
                    for k0 in range(0, kk, KT):
                        x0 = _tap_offset(k0, kh, kw, base, r_all * wq, dh * wq, dw)
                        x1 = _tap_offset(min(k0 + 1, kk - 1), kh, kw, base, r_all * wq, dh * wq, dw)
                        x2 = _tap_offset(min(k0 + 2, kk - 1), kh, kw, base, r_all * wq, dh * wq, dw)
                        _micro_dots(gyw, y0, y1, y2, y3, xb, x0, x1, x2, npix, tile)
                        for a in range(min(MW, og - o0)):
                            for j in range(min(KT, kk - k0)):
                                part[t, g * og + o0 + a, k0 + j] += tile[a, j]


def _grad_weight_v4(x, gy, w_shape, stride, padding, dilation, groups):
    """Stride 1: gw by register-blocked dot products (``_grad_weight_tiles_kernel``); else im2col (v2)."""
    if stride != (1, 1):
        return _grad_weight_im2col(x, gy, w_shape, stride, padding, dilation, groups)
    c_out = gy.shape[1]
    _, cg, kh, kw = w_shape
    nt = _item_threads()
    part = np.zeros((nt, c_out, cg * kh * kw), x.dtype)
    step, xb_size, wq = _taps_band(x.shape[1], c_out, gy.shape[2:], (kh, kw), dilation, x.dtype.itemsize)
    ws = _workspace(nt * (xb_size + c_out * step * wq + MW * KT), x.dtype).reshape(nt, -1)
    _grad_weight_tiles_kernel(x, gy, part, ws, step, kh, kw, padding[0][0], padding[1][0], *dilation, groups)
    return part.sum(axis=0).reshape(w_shape)


# ------------------------------------------- v5: explicit 512-bit micro-kernels (microkernels.py)

# v5's blocks: the forward's MR5 channels x NV5 vectors of pixels (8 x 48 float32: 24 zmm
# accumulators), grad_weight's MW5 channels x KT5 weights (4 x 5: 20 dot products in zmm; with 24, the
# 4 gy and 6 x vectors of a step no longer fit beside them and LLVM spills).
MR5, NV5, MW5, KT5 = 8, 3, 4, 5


@njit(cache=True, inline="always")
def _tap_offsets(offs, cg, kh, kw, c_stride, row_step, dw):
    """offs[(c*kh + p)*kw + q] = c*c_stride + p*row_step + q*dw: where weight (c, p, q)'s row of B starts in the band.

    Entries past Cg*kh*kw (the padding up to a whole block of weights) repeat the last offset.
    """
    k = 0
    for c in range(cg):
        for p in range(kh):
            for q in range(kw):
                offs[k] = c * c_stride + p * row_step + q * dw
                k += 1
    for j in range(k, offs.size):
        offs[j] = offs[k - 1]


@njit(cache=True, inline="always")
def _at(a, index):
    """The address of the value ``index`` places past the start of array ``a`` (a signed integer)."""
    return np.intp(a.ctypes.data) + index * a.itemsize


@njit(cache=True, inline="always")
def _vector_positions(xoffs, yoffs, rows, wq, row_len, lanes, wide, images, x_image, y_image):
    """Fill the tables of where each output vector of a band starts; return how many there are.

    ``wide``: the band's wide pixels (rows*Wq, garbage columns included) cut into consecutive
    vectors, at v*lanes in both the padded band and the wide buffer. Otherwise (Wo a multiple of
    the lanes) row ii's vectors start at ii*Wq + j0 in the band and at ii*Wo + j0 in y's plane,
    j0 = 0, lanes, ...: the blocks read and write y (or gy) in place, no garbage columns. In place,
    the same band of ``images`` consecutive images can be listed, image f's vectors shifted by
    f*x_image in the band buffer and f*y_image in y.
    """
    count = 0
    if wide:
        for v in range(-(-rows * wq // lanes)):
            xoffs[v] = yoffs[v] = v * lanes
            count += 1
    else:
        for f in range(images):
            for ii in range(rows):
                for j0 in range(0, row_len, lanes):
                    xoffs[count], yoffs[count] = f * x_image + ii * wq + j0, f * y_image + ii * row_len + j0
                    count += 1
    return count


@njit(cache=True, inline="always")
def _vector_band(x, ho, wo, step, images, kh, kw, dh, dw):
    """The v5 kernels' band geometry: (lanes, Wq, npad_max, band buffer size, bands per image).

    Wq = Wo + (kw-1) dw padded pixels per band row; a band of ``step`` output rows of ``images``
    images needs their input rows (plus the taps' reach) in the buffer, one vector of slack for
    the last vector's over-read; npad_max is a band's wide pixels rounded up to whole vectors.
    """
    lanes = VECTOR_BYTES // x.itemsize
    wq = wo + (kw - 1) * dw
    npad_max = -(-step * wq // lanes) * lanes
    xb_size = images * x.shape[1] * (step + (kh - 1) * dh) * wq + (kw - 1) * dw + lanes
    return lanes, wq, npad_max, xb_size, (ho + step - 1) // step


@njit(cache=True, inline="always")
def _product_strip(xb, x_at, xoffs_at, offs, wg_at, ldw, kk, y_at, yoffs_at, ldy, b_at, nv, mr):
    """``tile_product`` of one block of mr (MR5, or 4 for narrow outputs) channels over nv (1..NV5) vectors."""
    if mr == MR5:
        if nv == NV5:
            tile_product(xb, x_at, xoffs_at, _at(offs, 0), wg_at, ldw, kk, y_at, yoffs_at, ldy, b_at, MR5, NV5)
        elif nv == 2:
            tile_product(xb, x_at, xoffs_at, _at(offs, 0), wg_at, ldw, kk, y_at, yoffs_at, ldy, b_at, MR5, 2)
        else:
            tile_product(xb, x_at, xoffs_at, _at(offs, 0), wg_at, ldw, kk, y_at, yoffs_at, ldy, b_at, MR5, 1)
    elif nv == NV5:
        tile_product(xb, x_at, xoffs_at, _at(offs, 0), wg_at, ldw, kk, y_at, yoffs_at, ldy, b_at, 4, NV5)
    elif nv == 2:
        tile_product(xb, x_at, xoffs_at, _at(offs, 0), wg_at, ldw, kk, y_at, yoffs_at, ldy, b_at, 4, 2)
    else:
        tile_product(xb, x_at, xoffs_at, _at(offs, 0), wg_at, ldw, kk, y_at, yoffs_at, ldy, b_at, 4, 1)


def _direct_band(x, kernel_hw, out_hw, padding):
    """A 1x1 kernel with no padding reads x itself as its band: nothing to pad or copy."""
    return tuple(kernel_hw) == (1, 1) and padding[0][0] == padding[1][0] == 0 and tuple(x.shape[2:]) == tuple(out_hw)


@njit(cache=True)
def _pack_panel(w, b, groups, ogp, flip):
    """The weight panel wp[g, (c, p, q), o] = W[g*Og + o, c, p, q] (Og rounded up to ``ogp`` with zeros) and
    the bias bp[g, o] (zeros where ``b`` is empty) of the convolution whose kernel W is ``w``, or with
    ``flip``, grad_input's: w's taps flipped and its two channel axes swapped (``_grad_input_flipped``),
    read from w in place instead of copied to a flipped array first."""
    if flip:
        og_w, cg_w, kh, kw = w.shape  # the forward's (Og, Cg): here they are (Cg, Og)
        og, cg = cg_w, og_w // groups
    else:
        og, cg, kh, kw = w.shape[0] // groups, w.shape[1], w.shape[2], w.shape[3]
    wp = np.zeros((groups, cg * kh * kw, ogp), w.dtype)
    for g in range(groups):  # wp's rows in order (its writes are consecutive, w's reads are strided)
        for c in range(cg):
            for p in range(kh):
                for q in range(kw):
                    k = (c * kh + p) * kw + q
                    if flip:
                        for o in range(og):
                            wp[g, k, o] = w[g * cg + c, o, kh - 1 - p, kw - 1 - q]
                    else:
                        for o in range(og):
                            wp[g, k, o] = w[g * og + o, c, p, q]
    bp = np.zeros((groups, ogp), w.dtype)
    if b.size:
        for g in range(groups):
            for o in range(og):
                bp[g, o] = b[g * og + o]
    return wp, bp


@njit(parallel=True, cache=True)
def _forward_vector_kernel(x, w, b, flip, y, ws, ogp, table_len, step, kh, kw, pt, pl, dh, dw, groups, wide, mr, direct):
    """Stride 1: the taps product of ``_forward_taps_kernel``, MR5 channels x NV5 vectors at a time in registers.

    Per work item (image, band of output rows): pad the band (``_pad_band``), then for each
    strip of up to NV5 output vectors and each block of ``mr`` output channels (MR5; 4 when Og <
    MR5), ``tile_product`` sums all K = Cg*kh*kw terms, starting from the bias (bp, zero-padded);
    wp[g] is (K, Og rounded up to MR5), zero in the padded channels. In place (not ``wide``) the
    blocks write y directly; a last channel block that would run past Og starts at Og - mr instead
    (its overlap is computed twice, to the same values). ``wide``: the blocks fill a wide buffer
    yw (Og_pad rows of ``npad`` pixels) copied to y without its garbage columns afterwards.
    ``direct`` (a 1x1 kernel, no padding): the band is x's own rows, nothing is copied.
    Before the parallel loop, one thread packs wp and bp from w and b (``_pack_panel``, ``flip`` for
    grad_input) and allocates the threads' offset tables (``table_len`` entries each): work that
    compiled costs less than the NumPy calls that did it from Python, each of which pays Python's
    way back into the caches after the previous kernel.
    """
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    og, cg = c_out // groups, c_in // groups
    wp, bp = _pack_panel(w, b, groups, ogp, flip)
    kk = wp.shape[1]
    lanes, wq, npad_max, xb_size, bands = _vector_band(x, ho, wo, step, 1, kh, kw, dh, dw)
    isz = x.itemsize
    nt = ws.shape[0]
    tables = np.empty((nt, 3, table_len), np.int64)
    for t in prange(nt):
        xb, yw = ws[t, :xb_size], ws[t, xb_size : xb_size + ogp * npad_max]
        offs, xoffs, yoffs = tables[t, 0, :kk], tables[t, 1], tables[t, 2]
        lo, hi = _share(t, nt, n * bands)
        for item in range(lo, hi):
            i, i0, rows, r_all = _taps_item(item, bands, step, ho, kh, dh)
            npad = -(-rows * wq // lanes) * lanes
            if direct:
                _tap_offsets(offs, cg, 1, 1, ho * wo, 0, 0)
            else:
                _pad_band(x[i], xb[: c_in * r_all * wq + (kw - 1) * dw + npad - rows * wq], i0 - pt, r_all, pl, wq)
                _tap_offsets(offs, cg, kh, kw, r_all * wq, dh * wq, dw)
            count = _vector_positions(xoffs, yoffs, rows, wq, wo, lanes, wide, 1, 0, 0)
            for g in range(groups):
                x_at = _at(x, ((i * c_in + g * cg) * ho + i0) * wo) if direct else _at(xb, g * cg * r_all * wq)
                if wide:
                    y_at, ldy, o_last = _at(yw, 0), npad, ogp - mr
                else:
                    y_at, ldy, o_last = _at(y, ((i * c_out + g * og) * ho + i0) * wo), ho * wo, og - mr
                for s0 in range(0, count, NV5):
                    nv = min(NV5, count - s0)
                    for o0 in range(0, o_last + mr, mr):
                        o0 = min(o0, o_last)
                        _product_strip(xb, x_at, _at(xoffs, s0), offs, _at(wp[g], o0), ogp, kk,
                                       y_at + o0 * ldy * isz, _at(yoffs, s0), ldy, _at(bp[g], o0), nv, mr)
                if wide:  # drop the garbage columns
                    for o in range(og):
                        for ii in range(rows):
                            y[i, g * og + o, i0 + ii, :] = yw[o * npad + ii * wq : o * npad + ii * wq + wo]


def _forward_vector(x, w, b, out_hw, padding, dilation, groups, flip=False):
    """Stride 1: y by explicit-vector micro-tiles over padded bands (``_forward_vector_kernel``).
    ``flip``: the convolution with w's taps flipped and channel axes swapped (grad_input's)."""
    y, args = _forward_vector_call(x, w, b, out_hw, padding, dilation, groups, flip)
    _forward_vector_kernel(*args)
    return y


def _forward_vector_call(x, w, b, out_hw, padding, dilation, groups, flip=False):
    """(y, the arguments of ``_forward_vector_kernel``): ``_forward_vector`` up to its compiled call,
    which fills y. Split so that a fused op (``kernels/conv2d_batch_norm``) can run the kernel and
    what follows it in one compiled call."""
    x = np.ascontiguousarray(x)
    c_out, cg, kh, kw = (w.shape[1] * groups, w.shape[0] // groups, *w.shape[2:]) if flip else w.shape
    y = empty_aligned((x.shape[0], c_out, *out_hw), x.dtype)  # whole-vector rows start on cache lines
    og = c_out // groups
    ogp = -(-og // MR5) * MR5
    lanes = lanes_of(x.dtype)
    mr = MR5 if og >= MR5 else 4
    wide = og < mr or out_hw[1] % lanes != 0
    direct = _direct_band(x, (kh, kw), out_hw, padding) and not wide
    step, xb_size, wq = _taps_band(x.shape[1], c_out, out_hw, (kh, kw), dilation, x.dtype.itemsize)
    npad_max = -(-step * wq // lanes) * lanes
    nt = numba.get_num_threads()
    ws = _workspace(nt * (0 if direct else xb_size + lanes) + nt * (ogp * npad_max if wide else 0), x.dtype)
    table_len = max(cg * kh * kw, npad_max // lanes) + NV5
    return y, (x, w, given(b, x.dtype), flip, y, ws.reshape(nt, -1), ogp, table_len, step,
               kh, kw, padding[0][0], padding[1][0], *dilation, groups, wide, mr, direct)


def grad_input_kernel_call(gy, w, x_shape, stride, padding, dilation, groups):
    """(gx, arguments) of ``_forward_vector_kernel`` for ``conv2d_grad_input`` at its default version (a
    forward of gy with the kernel flipped), or None where that is not v5's compiled stride-1 path.
    gy need only have its shape yet: ``kernels/conv2d_batch_norm`` fills it in the same compiled call."""
    if DEFAULT_GRAD_INPUT_VERSION != 5 or stride != (1, 1):
        return None
    pad = _flipped_padding(w.shape[2:], dilation, padding)
    return _forward_vector_call(gy, w, None, tuple(x_shape[2:]), pad, dilation, groups, flip=True)


def grad_weight_kernel_call(x, gy, w_shape, stride, padding, dilation, groups):
    """The arguments of ``_grad_weight_outer_kernel`` (which returns gw as (C_out, Cg*kh*kw)) for
    ``conv2d_grad_weight`` at its default version, or None where v6 does not apply (see
    ``_grad_weight_v6``). gy need only have its shape yet (as above)."""
    if DEFAULT_GRAD_WEIGHT_VERSION != 6 or not _outer_applies(x, gy, w_shape, stride, dilation, groups):
        return None
    return _grad_weight_outer_args(x, gy, w_shape, padding, groups)


def forward_kernel_call(x, w, b, stride, padding, dilation, groups):
    """(y, arguments) of ``_forward_vector_kernel`` for ``conv2d_forward`` at its default version, or None
    where that is not v5's compiled stride-1 path (the caller then calls ``conv2d_forward``). For
    ``kernels/conv2d_batch_norm``, which runs this kernel and the batch norm in one compiled call."""
    if DEFAULT_FORWARD_VERSION != 5 or stride != (1, 1):
        return None
    return _forward_vector_call(x, w, b, _out_hw(x, w, stride, padding, dilation), padding, dilation, groups)


_forward_v5, _grad_input_v5 = _stride_one_version(_forward_vector, flips=True)


@njit(cache=True)
def _sum_threads(part, og, k_len):
    """gw (groups*og, k_len) from the threads' partial sums part[t, g, o, k] (any padding of o and k past og,
    k_len left out): gw[g*og + o, k] = part[0, g, o, k] + part[1, g, o, k] + ..., in thread order, a fixed
    order, so the result does not depend on how the parallel loop was scheduled (grad_weight v5 and v6)."""
    nt, groups = part.shape[0], part.shape[1]
    gw = np.empty((groups * og, k_len), part.dtype)
    for g in range(groups):
        for o in range(og):
            for k in range(k_len):
                total = part[0, g, o, k]
                for t in range(1, nt):
                    total += part[t, g, o, k]
                gw[g * og + o, k] = total
    return gw


@njit(parallel=True, cache=True)
def _grad_weight_vector_kernel(x, gy, ws, tables, ogp, kp, step, fold, kh, kw, pt, pl, dh, dw, groups, wide, direct):
    """Stride 1: gw (C_out, Cg*kh*kw) = the sum over threads t of part[t, g, o, k], thread t's share of
    gw[g*Og + o, k] = sum over its items of gy_wide[i, g*Og + o] . view_k (part has Og and the weights
    padded to ogp x kp, whole blocks; the threads' parts are added in a fixed order after the parallel
    loop, so the result does not depend on scheduling). The kernel owns its output from zero to the
    end: no NumPy work before or after it.

    The operands are ``_grad_weight_taps_kernel``'s, and ``tile_dots`` computes MW5 channels x KT5
    weights per call, each a dot product over the item's output vectors. In place (not ``wide``:
    Og a multiple of MW5, Wo of the lanes) it reads gy's rows where they are, and an item is a band
    of ``fold`` consecutive images (whole images, when several fit the band buffer): longer dot
    products, fewer sums across lanes. ``wide``: an item is one image's band, and gy's band is first
    copied to ``gyw``, Og_pad rows per group of ``npad`` wide pixels, zero in the garbage columns,
    past the band's last pixel and in the padded channels, so those add nothing. ``direct`` (a 1x1
    kernel, no padding, in place): x's own rows are the band.
    """
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    og, cg = c_out // groups, c_in // groups
    lanes, wq, npad_max, xb_size, bands = _vector_band(x, ho, wo, step, fold, kh, kw, dh, dw)
    runs = (n + fold - 1) // fold
    nt = ws.shape[0]
    part = np.zeros((nt, groups, ogp, kp), x.dtype)
    for t in prange(nt):
        xb, gyw = ws[t, :xb_size], ws[t, xb_size : xb_size + groups * ogp * npad_max]
        offs, xoffs, gyoffs = tables[t, 0, :kp], tables[t, 1], tables[t, 2]
        lo, hi = _share(t, nt, runs * bands)
        for item in range(lo, hi):
            run, i0, rows, r_all = _taps_item(item, bands, step, ho, kh, dh)
            i = run * fold
            images = min(fold, n - i)
            npad = -(-rows * wq // lanes) * lanes
            if direct:
                image = c_in * ho * wo  # from one image's rows to the next one's, in x
                _tap_offsets(offs, cg, 1, 1, ho * wo, 0, 0)
            else:
                image = c_in * r_all * wq  # one image's padded band in xb
                for f in range(images):
                    end = (f + 1) * image + ((kw - 1) * dw + npad - rows * wq if f == images - 1 else 0)
                    _pad_band(x[i + f], xb[f * image : end], i0 - pt, r_all, pl, wq)
                _tap_offsets(offs, cg, kh, kw, r_all * wq, dh * wq, dw)
            count = _vector_positions(xoffs, gyoffs, rows, wq, wo, lanes, wide, images, image, c_out * ho * wo)
            if wide:
                gyw[: groups * ogp * npad] = 0
                for g in range(groups):
                    for o in range(og):
                        for ii in range(rows):
                            dst = (g * ogp + o) * npad + ii * wq
                            gyw[dst : dst + wo] = gy[i, g * og + o, i0 + ii]
            for g in range(groups):
                x_at = _at(x, ((i * c_in + g * cg) * ho + i0) * wo) if direct else _at(xb, g * cg * r_all * wq)
                for o0 in range(0, ogp, MW5):
                    if wide:
                        gy_at, ldg = _at(gyw, (g * ogp + o0) * npad), npad
                    else:
                        gy_at, ldg = _at(gy, ((i * c_out + g * og + o0) * ho + i0) * wo), ho * wo
                    for k0 in range(0, kp, KT5):
                        tile_dots(xb, gy_at, _at(gyoffs, 0), ldg, x_at, _at(xoffs, 0), _at(offs, k0), count, _at(part[t, g, o0], k0), kp, MW5, KT5)
    return _sum_threads(part, og, cg * kh * kw)


def _dots_band(n, threads, ho, row_vectors):
    """(rows per band, images per item) of v5 grad_weight in place: dot products of about ``_DOTS_VECTORS``
    vectors -- long enough that the sums across lanes at the end cost little, short enough that the
    rows they read stay in L1 -- and, when a band is a whole image, a run of images that divides each
    thread's share of the N images (so the items split evenly)."""
    rows = max(1, min(ho, _DOTS_VECTORS // row_vectors))
    if rows < ho:
        return rows, 1
    share = -(-n // threads)
    most = max(1, _DOTS_VECTORS // (ho * row_vectors))
    return ho, max(f for f in range(1, share + 1) if share % f == 0 and f <= most)


def _grad_weight_v5(x, gy, w_shape, stride, padding, dilation, groups):
    """Stride 1: gw by explicit-vector dot-product tiles (``_grad_weight_vector_kernel``); else im2col (v2)."""
    if stride != (1, 1):
        return _grad_weight_im2col(x, gy, w_shape, stride, padding, dilation, groups)
    x, gy = np.ascontiguousarray(x), np.ascontiguousarray(gy)
    c_out, cg, kh, kw = w_shape
    og = c_out // groups
    ogp, kp = -(-og // MW5) * MW5, -(-(cg * kh * kw) // KT5) * KT5
    lanes = lanes_of(x.dtype)
    (ho, wo), (dh, dw) = gy.shape[2:], dilation
    wide = og % MW5 != 0 or wo % lanes != 0
    nt = numba.get_num_threads()
    step, xb_size, wq = _taps_band(x.shape[1], c_out, (ho, wo), (kh, kw), dilation, x.dtype.itemsize)
    fold = 1
    if not wide:  # gy is read in place: the band buffer holds only x
        step, fold = _dots_band(x.shape[0], nt, ho, wo // lanes)
        xb_size = fold * x.shape[1] * (step + (kh - 1) * dh) * wq + (kw - 1) * dw
    npad_max = -(-step * wq // lanes) * lanes
    ws = _workspace(nt * (xb_size + lanes + groups * ogp * npad_max), x.dtype).reshape(nt, -1)
    tables = np.empty((nt, 3, max(kp, fold * step * -(-wq // lanes) + 1)), np.int64)
    direct = _direct_band(x, (kh, kw), (ho, wo), padding) and not wide
    return _grad_weight_vector_kernel(x, gy, ws, tables, ogp, kp, step, fold, kh, kw, padding[0][0], padding[1][0], *dilation,
                                      groups, wide, direct).reshape(w_shape)


# ------------------------------------- v6: grad_weight as outer products (microkernels.tile_outer)

# v6's block: MO6 vectors of output channels x the 9 taps of one input channel (2 x 9 = 18 zmm
# accumulators), or, when Og is one vector, 1 x the taps of CB6 channels (27); more spills.
MO6, CB6 = 2, 3
_OUTER_BYTES = 16 << 10  # the rows of gy^T transposed and then streamed by the tile_outer calls: with their x rows, inside L1
# Below this many input channels per group, v5: each value of gy^T serves only Cg*9 taps, so its
# transpose weighs. For the 3->16 first layer (2 threads, 300 alternating calls, 3 runs) v6 took
# 152-155 us and v5 155-163: within a few percent, so v5 stays where it was measured better before
# (one thread, under load, with the band-wide transposes: 34% of a core's peak vs v5's 40%).
_OUTER_MIN_CG = 8


@njit(cache=True, inline="always")
def _outer_block(xb, gt_at, ldg_row, ldg_pix, x_at, cs, wq, rows, wo, out_at, ldo, mo, cb):
    """``tile_outer`` for a block of mo (1 or MO6) vectors of channels x cb (1..CB6) input channels' 3x3 taps."""
    if mo == MO6:
        tile_outer(xb, gt_at, ldg_row, ldg_pix, x_at, cs, wq, rows, wo, out_at, ldo, MO6, 1, 3, 3)
    elif cb == 3:
        tile_outer(xb, gt_at, ldg_row, ldg_pix, x_at, cs, wq, rows, wo, out_at, ldo, 1, 3, 3, 3)
    elif cb == 2:
        tile_outer(xb, gt_at, ldg_row, ldg_pix, x_at, cs, wq, rows, wo, out_at, ldo, 1, 2, 3, 3)
    else:
        tile_outer(xb, gt_at, ldg_row, ldg_pix, x_at, cs, wq, rows, wo, out_at, ldo, 1, 1, 3, 3)


@njit(parallel=True, cache=True)
def _grad_weight_outer_kernel(x, gy, ws, xb_len, step, chunk, pt, pl, groups):
    """3x3, stride 1, dilation 1: gw (C_out, Cg*9) = the sum over threads t of part[t, g, (c, p, q), o], thread
    t's share of gw[g*Og + o, (c, p, q)] = sum over its items' pixels of gy[i, g*Og + o, pixel] *
    x_pad[i, g*Cg + c, pixel shifted by (p, q)] (added in a fixed order after the parallel loop: the
    result does not depend on scheduling).

    Per work item (image, band of output rows): pad the band of x (``_pad_band``, rows of Wq = Wo + 2).
    Then, one group at a time, for every few rows (``chunk``, so that what a call reads stays in L1):
    transpose those rows of gy to ``gt`` = gy^T (pixel-major: a pixel's Og channels are consecutive),
    lanes x lanes blocks at a time in registers (``transpose_block``), and for every block of
    output-channel vectors and every block of input channels, ``tile_outer`` adds the outer products
    of a vector of gy^T and each tap's value of x, broadcast: no sum across lanes, so the
    accumulators need no reduction and x's values need no alignment. (gt is written and read back
    while it is in L1; a band's whole gt, transposed first, went through L2.)
    """
    n, c_in = x.shape[0], x.shape[1]
    c_out, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    og, cg = c_out // groups, c_in // groups
    lanes = VECTOR_BYTES // x.itemsize
    wq = wo + 2
    bands = (ho + step - 1) // step
    nt = ws.shape[0]
    part = np.zeros((nt, groups, cg * 9, og), x.dtype)
    for t in prange(nt):
        xb, gt = ws[t, :xb_len], ws[t, xb_len:]
        lo, hi = _share(t, nt, n * bands)
        for item in range(lo, hi):
            i, i0, rows, r_all = _taps_item(item, bands, step, ho, 3, 1)
            cs = r_all * wq  # from one channel's padded rows to the next
            _pad_band(x[i], xb[: c_in * cs], i0 - pt, r_all, pl, wq)
            for g in range(groups):
                for r0 in range(0, rows, chunk):
                    nr = min(chunk, rows - r0)
                    for ii in range(nr):  # gy^T of these rows, used while it is in L1
                        for j0 in range(0, wo, lanes):
                            for o0 in range(0, og, lanes):
                                src = ((i * c_out + g * og + o0) * ho + i0 + r0 + ii) * wo + j0
                                transpose_block(gt, _at(gy, src), ho * wo, _at(gt, (ii * wo + j0) * og + o0), og)
                    for o0 in range(0, og, MO6 * lanes):
                        mo = min(MO6, (og - o0) // lanes)
                        cb_max = CB6 if mo == 1 else 1
                        for c0 in range(0, cg, cb_max):
                            _outer_block(xb, _at(gt, o0), wo * og, og, _at(xb, (g * cg + c0) * cs + r0 * wq), cs, wq,
                                         nr, wo, _at(part[t, g], c0 * 9 * og + o0), og, mo, min(cb_max, cg - c0))
    return _sum_threads(part.transpose(0, 1, 3, 2), og, cg * 9)  # part[t, g] is (k, o) here


def _aligned_workspace(size: int, dtype) -> np.ndarray:
    """``_workspace`` whose first value sits on a cache line (so do rows of a multiple of the lanes)."""
    buf = _workspace(size + VECTOR_BYTES // np.dtype(dtype).itemsize, dtype)
    start = (-buf.ctypes.data % VECTOR_BYTES) // buf.itemsize
    return buf[start : start + size]


def _grad_weight_v6(x, gy, w_shape, stride, padding, dilation, groups):
    """float32, 3x3, stride 1, dilation 1, Og and Wo whole vectors, Cg >= ``_OUTER_MIN_CG``: gw by outer
    products (``_grad_weight_outer_kernel``); else v5. (float64 -- gradient checks, reference precision
    -- keeps v5: one compiled kernel fewer, ~15 s of compilation on a fresh machine.)"""
    if not _outer_applies(x, gy, w_shape, stride, dilation, groups):
        return _grad_weight_v5(x, gy, w_shape, stride, padding, dilation, groups)
    x, gy = np.ascontiguousarray(x), np.ascontiguousarray(gy)
    return _grad_weight_outer_kernel(*_grad_weight_outer_args(x, gy, w_shape, padding, groups)).reshape(w_shape)


def _outer_applies(x, gy, w_shape, stride, dilation, groups):
    """v6's conditions (see ``_grad_weight_v6``)."""
    c_out, cg, kh, kw = w_shape
    lanes = lanes_of(x.dtype)
    return (x.dtype == np.float32 and stride == (1, 1) and tuple(dilation) == (1, 1) and (kh, kw) == (3, 3)
            and (c_out // groups) % lanes == 0 and gy.shape[3] % lanes == 0 and cg >= _OUTER_MIN_CG)


def _grad_weight_outer_args(x, gy, w_shape, padding, groups):
    """The arguments of ``_grad_weight_outer_kernel`` for C-contiguous x and gy (band geometry, workspace)."""
    c_out = w_shape[0]
    lanes = lanes_of(x.dtype)
    ho, wo = gy.shape[2:]
    nt = numba.get_num_threads()
    step, _, wq = _taps_band(x.shape[1], c_out, (ho, wo), (3, 3), (1, 1), x.dtype.itemsize)
    chunk = max(1, min(step, _OUTER_BYTES // (wo * (c_out // groups) * x.dtype.itemsize)))  # rows of gt
    xb_len = -(-x.shape[1] * (step + 2) * wq // lanes) * lanes  # whole vectors: gy^T's rows start on a cache line
    ws = _aligned_workspace(nt * (xb_len + chunk * wo * (c_out // groups)), x.dtype).reshape(nt, -1)
    return x, gy, ws, xb_len, step, chunk, padding[0][0], padding[1][0], groups


# ----------------------------------------------------------------------- versions

FORWARD_VERSIONS = {1: _forward_v1, 2: _forward_v2, 3: _forward_v3, 4: _forward_v4, 5: _forward_v5}
GRAD_INPUT_VERSIONS = {1: _grad_input_v1, 2: _grad_input_col2im, 3: _grad_input_v3, 4: _grad_input_v4, 5: _grad_input_v5}
GRAD_WEIGHT_VERSIONS = {1: _grad_weight_v1, 2: _grad_weight_im2col, 3: _grad_weight_v3, 4: _grad_weight_v4, 5: _grad_weight_v5,
                        6: _grad_weight_v6}
DEFAULT_FORWARD_VERSION = DEFAULT_GRAD_INPUT_VERSION = 5
DEFAULT_GRAD_WEIGHT_VERSION = 6


def _pick(versions, version, function):
    if version not in versions:
        raise ValueError(f"{function}: version must be one of {sorted(versions)}, got {version!r}")
    return versions[version]


def conv2d_forward(x, w, b, stride, padding, dilation, groups, version=DEFAULT_FORWARD_VERSION):
    """y = conv(x, W) + b; ``version`` picks a kernel of FORWARD_VERSIONS (see the module docstring)."""
    return _pick(FORWARD_VERSIONS, version, "conv2d_forward")(x, w, b, stride, padding, dilation, groups)


def conv2d_grad_input(gy, w, x_shape, stride, padding, dilation, groups, version=DEFAULT_GRAD_INPUT_VERSION):
    """gx (x_shape); ``version`` picks a kernel of GRAD_INPUT_VERSIONS (see the module docstring)."""
    return _pick(GRAD_INPUT_VERSIONS, version, "conv2d_grad_input")(gy, w, x_shape, stride, padding, dilation, groups)


def conv2d_grad_weight(x, gy, w_shape, stride, padding, dilation, groups, version=DEFAULT_GRAD_WEIGHT_VERSION):
    """gw (w_shape); ``version`` picks a kernel of GRAD_WEIGHT_VERSIONS (see the module docstring)."""
    return _pick(GRAD_WEIGHT_VERSIONS, version, "conv2d_grad_weight")(x, gy, w_shape, stride, padding, dilation, groups)


@njit(parallel=True, fastmath=True, cache=True)
def _grad_bias_kernel(planes, gb):
    """gb[o] = sum over images i and pixels k of planes[i, o, k]: one output channel per ``prange``
    iteration; each plane's sum in the array's dtype, the planes' sums in float64. ``fastmath`` lets LLVM
    reorder the plane's additions, so it sums with vector accumulators (a sequential float sum
    would wait on each add's latency): another order than NumPy's pairwise one, with an error of
    the same size (tests/kernels/test_conv2d.py bounds it)."""
    n, c, size = planes.shape
    for o in prange(c):
        total = 0.0
        for i in range(n):
            row = planes[i, o]
            acc = row[0] - row[0]  # 0 in the array's dtype
            for k in range(size):
                acc += row[k]
            total += acc
        gb[o] = total


def conv2d_grad_bias(gy):
    """gb = gy summed over batch, rows and columns, in one compiled pass over gy (``_grad_bias_kernel``).
    NumPy's ``gy.sum(axis=(0, 2, 3))`` is slower (an estimate from one in-cache timing on the U-Net's
    shapes, 2 threads, not a benchmark: 5-14 us vs 21-102 us); ``ops --layers`` times it in the head's case."""
    n, c = gy.shape[:2]
    gb = np.empty(c, gy.dtype)
    if gy.size:
        _grad_bias_kernel(np.ascontiguousarray(gy).reshape(n, c, -1), gb)
    else:
        gb[...] = 0
    return gb
