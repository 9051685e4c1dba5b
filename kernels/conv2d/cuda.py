"""conv2d on the GPU: Numba CUDA kernels, the forward in numbered versions.

Read ``reference.py`` first: it defines the op and derives the gradients. Here
the same sums are spread over CUDA threads. Notation (as in the reference)::

    x (N, C_in, H, W)   w (C_out, Cg, kh, kw)   y, gy (N, C_out, Ho, Wo)
    G groups, Cg = C_in/G input and Og = C_out/G output channels per group;
    output channel o is in group g = o // Og and reads input channels g*Cg + c, c < Cg.
    Output (i, j) reads, through kernel tap (p, q), the input pixel
        h = i*sh - pt + p*dh,   v = j*sw - pl + q*dw     (zero outside [0, H) x [0, W))

The kernels derive G, Cg, Og, kh, kw and the sizes from the array shapes, so a
launch passes only stride, the top/left padding and dilation (bottom/right
padding only decide Ho, Wo, i.e. the shape of y); the v3/v4 kernels have these
compiled in instead, one cached kernel per geometry.

Forward versions (llm.c dev/cuda style: each is checked against the reference by
tests/cuda/test_conv2d_cuda.py and can be timed on its own through
``conv2d_forward(..., version=k)`` or ``FORWARD_VERSIONS``):

* **v1 direct** -- one thread per output element runs the whole
  Cg*kh*kw-term dot product from global memory. Simple and fully parallel, but
  every input pixel is fetched by up to Og*kh*kw threads and every weight by all
  N*Ho*Wo threads of its channel: memory traffic, not arithmetic, bounds it.
* **v2 implicit GEMM** -- per group, conv2d is the matrix product
  ``Y[o, m] = sum_k W[o, k] * X[k, m]`` with k = (c, p, q) running over
  K = Cg*kh*kw and m = (n, i, j) over N*Ho*Wo; ``X[k, m]`` is the input pixel
  that tap k of output m reads (the im2col matrix). v2 never builds X in memory
  (that would take kh*kw times the input): a TILE x TILE block computes a tile of
  TILE channels x TILE output pixels, and for each slice of TILE values of k it
  stages a tile of W and a tile of X -- gathered on the fly with the index
  arithmetic above, zero for padding -- in shared memory, then every thread
  reads TILE values of each from there. Each global value is now loaded once
  per block instead of once per thread: TILE times less traffic. Loads are
  coalesced (neighbouring threads read neighbouring k of a weight row, or
  neighbouring output columns of an image row), and the inner loop is free of
  bank conflicts (``ws[ty, t]`` is one address per warp row, a broadcast;
  ``xs[t, tx]`` is consecutive addresses). Partial tiles at every edge load
  zeros and skip their writes. A group with Og < TILE channels gets a block of
  only Og rows (``_channel_rows``), each thread staging several rows of X, so
  the thin early layers of a U-Net do not launch idle rows of threads.
* **v3 register-tiled implicit GEMM** -- v2's inner loop does two shared loads
  per FMA, so shared-memory bandwidth, not the FMA units, caps it (a warp's
  loads and FMAs issue from the same slots). v3 changes four things:

  - *Register tiles.* A 256-thread block computes a BM x BN tile of Y (64 x 64
    by default; 16 x 256 or 32 x 128 when a group has <= 16 or <= 32 channels,
    ``TILES_V3``) and each thread a TM x TN = 4 x 4 tile of it in registers:
    per step t of a K-slice it loads 4 weights and 4 pixels from shared memory
    and does 16 FMAs -- 4 FMAs per shared value instead of 1/2, and every global
    value is reused BN (or BM) times instead of TILE = 16 times.
  - *128-bit shared loads.* The tiles are stored (BK, BM/TM, TM) and
    (BK, BN/TN, TN), so a thread's 4 values are one aligned run: the 8 loads of
    a step are two ``ld.shared.v4``. A warp's 16-byte loads of consecutive
    runs are conflict-free; the weight row is a broadcast.
  - *Compile-time geometry.* Kernel size, stride, padding, dilation and tiles are
    constants of a kernel compiled per geometry and cached
    (``_forward_tiled_kernel``, a dict keyed by the geometry). K is walked as
    taps (p, q) x slices of BK input channels, so a slice's X rows are channels
    of one input pixel and advancing is a counter update: no division or
    remainder is left in any loop (the pixel of each thread is decoded once),
    where v2 did three run-time divisions per staged value. The weights are
    first transposed to (kh, kw, Cg, C_out) so a slice's staging is coalesced.
  - *Prefetch and launch bounds.* The next K-slice is loaded from global memory
    into registers before the FMAs of the current one, so the loads' latency
    overlaps the arithmetic (one shared buffer, two barriers per slice);
    ``launch_bounds=256`` lets the compiler use up to 255 registers.

  BK = 16: with BK = 8 the slice loop (FMAs plus staging, counters and
  barriers) was 44% FMA instructions; with 16 the staging cost per FMA halves.
  The step itself is generated straight-line (``_micro_tile``): a
  ``for t in range(BK)`` was unrolled only 2x by NVVM. The staging loads index
  with unsigned integers (``_at``), which drops Numba's negative-index
  wrap-around, a compare and select per index. Cost: a tap's last slice is
  partial when BK does not divide Cg (the 3-channel first layer uses 3 of 16
  rows).
* **v4** -- v3's kernel with 8 x 8 register tiles and 128 x 128 block tiles
  (``TILES_V4``; 64 x 256 for <= 64 channels, 32 x 256 with 4 x 8 register
  tiles for <= 32, v3's tiles for <= 16), BK = 8: 64 FMAs per 16 shared values
  (4 per ``ld.shared.v4``), at the price of ~160 registers: one 256-thread block
  per SM instead of two, less latency hiding. Which wins is for the GPU
  benchmark to say.

Static figures (not timings): the share of FMA instructions in the innermost
loop (the K-slice loop: FMAs, shared loads, staging, counters, barriers),
divisions in loops, and registers with the kernels' launch bounds, counted in
the PTX that numba-cuda 0.30.4 emits for sm_90 in float32 and as nvJitLink
assembles it, for 3x3 stride 1, 3x3 stride 2 and 1x1 kernels:

  =======  ===========================  =========  =========  ============
  version  tiles BM x BN x BK, TM x TN  FMA share  registers  div in loops
  =======  ===========================  =========  =========  ============
  v2       16 x 16 x 16, 1 x 1          6%         88         10
  v3       64 x 64 x 16, 4 x 4          54-56%     113-116    0
  v3       32 x 128 x 16, 4 x 4         52-53%     115        0
  v3, v4   16 x 256 x 16, 4 x 4         45-46%     130        0
  v4       32 x 256 x 8, 4 x 8          54-56%     126        0
  v4       64 x 256 x 8, 8 x 8          68-69%     164-166    0
  v4       128 x 128 x 8, 8 x 8         70%        158-160    0
  =======  ===========================  =========  =========  ============

No spills in any. The thin tiles stage more values per FMA ((BM + BN)/(BM*BN)
per FMA), hence their lower share. Under the simulator the tiled versions
default to ``SIMULATOR_TILES`` (64-thread blocks), since one Python thread per
CUDA thread makes big blocks slow; the tests run every GPU tile configuration.

v4 is the default, as measured on a GPU (an H100, 2026-11-28, ``python -m benchmarks gpu --all``;
benchmarks/RESULTS.md): 96%, 60% and 61% of cuDNN's time (TF32 off) on the three benchmark
shapes, where v3 reached 85%, 54% and 50%. Statically, v3 had looked the safer choice (113-116
registers fit two 256-thread blocks per SM, v4's ~160 one), v4 having the higher FMA share; the
card decided for the FMA share.

Backward (no atomics anywhere, so results are deterministic):

* **grad_input** (``GRAD_INPUT_VERSIONS``, ``conv2d_grad_input(..., version=k)``):

  * **v1 gather** -- one thread per input element sums
    ``w[o, c, p, q] * gy[n, o, i, j]`` over the taps (p, q) whose output position
    ``i = (h + pt - p*dh) / sh`` (and j likewise) is an integer inside [0, Ho) --
    the transposed index map of the forward. A scatter from the outputs would
    need atomic adds, which serialise on collisions and make float sums
    order-dependent. Its tap loops divide by the run-time stride.
  * **v3** -- at stride 1, grad_input *is* a forward convolution: gy convolved
    with the taps flipped and input/output channels swapped per group,
    ``w'[c, o, p', q'] = w[o, c, kh-1-p', kw-1-q']``, padding
    ``pt' = dh*(kh-1) - pt`` (negative when the padding reaches past the kernel:
    the bounds checks treat it like any other). So it runs forward v3's kernel
    at forward v3's speed, instead of a gather that reads every weight from
    global memory once per input element. At stride > 1 the flipped forward would
    multiply the zeros of a dilated gy, so v3 keeps the gather, compiled per
    geometry like v3's forward (``_grad_input_gather_kernel``): the stride
    divisions become shifts or multiplications, none left in its loops.

  v3 is the default: at stride 1, the forward's register tiles instead of a
  gather; at stride > 1, v1's gather without run-time divisions.
* **grad_weight** needs, per weight, a sum over all N*Ho*Wo output pixels --
  far too long for one thread. Two numbered versions (``GRAD_WEIGHT_VERSIONS``,
  ``conv2d_grad_weight(..., version=k)``), checked and timed like the forward's:

  * **v1 block reduction** -- one block per weight element; its threads stride
    over m = (n, i, j) (consecutive threads read consecutive j: coalesced), then
    a shared-memory tree reduction adds the per-thread partial sums. Every block
    re-reads the gy plane of its output channel and an x plane: gy is read
    Cg*kh*kw times and x Og*kh*kw times from global memory, and the launch is
    C_out*Cg*kh*kw blocks of up to REDUCE_THREADS threads.
  * **v2 implicit GEMM** -- the forward's product seen from the weights: per
    group, ``gW[o, k] = sum_m gY[o, m] * X[k, m]`` with the same im2col matrix X
    (k = (c, p, q), m = (n, i, j)), i.e. (Og x M) @ (M x K) with a long
    reduction dimension M. A block computes a tile of TILE output channels
    (fewer when Og is smaller, as in the forward) x TILE taps of gW and walks M
    in TILE-wide slices; for each it
    stages a tile of gy and a tile of X (gathered as in the forward, zero for
    padding and past the edges) in shared memory, then every thread reads TILE
    values of each from there. Each gy and x value is loaded once per tile
    instead of once per weight: gy ceil(K/TILE) times instead of K times, x
    ceil(Og/TILE)*kh*kw times instead of Og*kh*kw times. And the launch is one
    thread per weight, rounded up to whole tiles, not a block per weight.
    When the weight tiles alone are too few blocks to fill the GPU (few
    channels, large images), M is also split over S blocks per tile (split-K,
    see ``_grad_weight_splits``); each writes a partial gW and one array sum
    adds the S partials, so there are still no atomics.

  * **v3 register-tiled** -- v2's product with forward v3's machinery: a
    256-thread block computes a BM output channels x BN taps tile of gW (same
    ``TILES_V3``), each thread a 4 x 4 register tile from 128-bit shared loads,
    next slice prefetched into registers, geometry compile-time
    (``_grad_weight_tiled_kernel``). M is walked as (n, i) rows x slices of BK
    output columns: each thread decodes its taps (c, p, q) once, and advancing
    a slice is a counter update -- no division in the pixel loop (v2 did five
    per staged value). Split-K as in v2 (``_grad_weight_splits``); the S partial
    gW (and gb) are added by ``_sum_splits_kernel`` in split order: a fixed
    order, deterministic, no atomics. ``conv2d_grad_weight_bias`` also returns
    grad_bias from the same pass: in the blocks of the first tap column each
    thread adds up the gy values it stages (one add per value, in registers),
    and the block adds those partial sums in a fixed order at the end. Static
    figures as for the forward: the pixel loop is 50-55% FMA instructions with
    64 x 64 tiles (45-50% with 32 x 128, 38-41% with 16 x 256), no divisions,
    117-133 registers with 64 x 64 tiles (up to 236 with 16 x 256), no spills.

  v3 is the default: 4 FMAs per shared value instead of 1/2 and no divisions
  in its loops (static figures; not yet timed on a GPU).
* **grad_bias** -- the split per-channel sum of ``cuda_common.channel_sums`` (a grid of channels x
  splits, warp shuffles, a fixed-order second pass; shared with batch-norm). It replaced
  a one-block-per-channel reduction, the same pattern as grad_weight v1, which stays the
  example of that first version.

Block sizes of the reductions are the smallest power of two covering N*Ho*Wo,
between one warp and REDUCE_THREADS, so small images do not idle threads.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, types

from kernels import cuda_common as cc
from kernels.shapes import conv_output_size

__all__ = ["conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight", "conv2d_grad_bias"]

THREADS = 128  # block size of the one-thread-per-element kernels
GATHER_MIN_BLOCKS = 5  # grad_input v3 gather: launch bounds ask for this many resident blocks per SM
TILE = 16  # v2: a TILE x TILE block computes TILE output channels x TILE output pixels (or taps)
TILE_PADDED = TILE + 1  # a named constant: shared-array shapes must be compile-time literals
REDUCE_THREADS = 128  # largest block (a power of two) of the reductions
SPLIT_TARGET_BLOCKS = 512  # grad_weight v2 splits M until its grid has about this many blocks ...
SPLIT_MIN_TILES = 8  # ... but keeps at least this many TILE-wide slices of M per split


# ------------------------------------------------------------------------ forward


@cuda.jit
def _forward_direct_kernel(x, w, b, y, sh, sw, pt, pl, dh, dw):
    """v1: thread e computes y.flat[e] as one dot product read from global memory."""
    e = cuda.grid(1)
    if e >= y.size:
        return
    _, c_out, ho, wo = y.shape
    _, c_in, h_in, w_in = x.shape
    cg, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    # j fastest: consecutive threads write consecutive addresses of y.
    n, o, i, j = cc.unravel4(e, c_out, ho, wo)
    c0 = (o // (c_out // (c_in // cg))) * cg  # first input channel of o's group
    acc = b[o]
    for c in range(cg):
        for p in range(kh):
            h = i * sh - pt + p * dh
            if 0 <= h < h_in:
                for q in range(kw):
                    v = j * sw - pl + q * dw
                    if 0 <= v < w_in:
                        acc += w[o, c, p, q] * x[n, c0 + c, h, v]
    y[n, o, i, j] = acc


@cuda.jit
def _forward_gemm_kernel(x, w2, b, y, sh, sw, pt, pl, dh, dw, kh, kw):
    """v2: block (bx, by, g) computes channels g*Og + by*R + ty, pixels m = bx*TILE + tx.

    The block is TILE x R with R = blockDim.y <= TILE rows of channels (see
    ``_channel_rows``). ``w2`` is w viewed as (C_out, K); thread (tx, ty) stages
    W[o0 + ty, k0 + tx] and the rows X[k0 + r, m0 + tx], r = ty, ty + R, ... < TILE,
    of each K-slice, so both loads have tx on the contiguous axis.
    """
    ws = cuda.shared.array((TILE, TILE), dtype=w2.dtype)
    xs = cuda.shared.array((TILE, TILE), dtype=x.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    g = cuda.blockIdx.z
    zero = x.dtype.type(0)
    n_img, c_in, h_in, w_in = x.shape
    _, c_out, ho, wo = y.shape
    k_total = w2.shape[1]
    cg = c_in // cuda.gridDim.z
    og = c_out // cuda.gridDim.z
    rows = cuda.blockDim.y
    o_in_group = cuda.blockIdx.y * rows + ty  # this thread's output channel within the group ...
    o = g * og + o_in_group
    m = cuda.blockIdx.x * TILE + tx  # ... and output pixel m = (n, i, j)
    j = m % wo
    i = (m // wo) % ho
    n = m // (wo * ho)
    # The weight row this thread loads is its own output channel's (same ty).
    acc = zero
    for k0 in range(0, k_total, TILE):
        k = k0 + tx
        ws[ty, tx] = w2[o, k] if o_in_group < og and k < k_total else zero
        # The X column this thread loads is its own pixel m; the rows are taps k = (c, p, q).
        for r in range(ty, TILE, rows):
            k = k0 + r
            val = zero
            if k < k_total and n < n_img:
                c = k // (kh * kw)
                p = (k // kw) % kh
                q = k % kw
                h = i * sh - pt + p * dh
                v = j * sw - pl + q * dw
                if 0 <= h < h_in and 0 <= v < w_in:
                    val = x[n, g * cg + c, h, v]
            xs[r, tx] = val
        cuda.syncthreads()  # tiles complete before anyone reads them
        for t in range(TILE):
            acc += ws[ty, t] * xs[t, tx]
        cuda.syncthreads()  # everyone done reading before the next slice overwrites them
    if o_in_group < og and n < n_img:
        y[n, o, i, j] = acc + b[o]


def _float_inputs(*arrays):
    """Contiguous device arrays, all of the first one's float dtype (float32 or float64)."""
    dtype = np.dtype(arrays[0].dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"conv2d cuda kernels take float32 or float64, got {dtype}")
    for a in arrays[1:]:
        if np.dtype(a.dtype) != dtype:
            raise TypeError(f"conv2d cuda kernels need one dtype for all arrays, got {dtype} and {a.dtype}")
    return [cc.as_input(a) for a in arrays]


def _forward_setup(x, w, b, stride, padding, dilation):
    """Checked inputs (a zero bias when b is None), the fresh output y, and the scalar launch arguments."""
    x, w = _float_inputs(x, w)
    b = cc.zeros((w.shape[0],), x.dtype) if b is None else _float_inputs(x, b)[1]
    n, _, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    (pt, pb), (pl, pr) = padding
    ho = conv_output_size(h, pt + pb, dilation[0], kh, stride[0])
    wo = conv_output_size(wd, pl + pr, dilation[1], kw, stride[1])
    y = cc.empty((n, c_out, ho, wo), x.dtype)
    return x, w, b, y, (stride[0], stride[1], pt, pl, dilation[0], dilation[1])


def _forward_v1(x, w, b, stride, padding, dilation, groups):
    x, w, b, y, args = _forward_setup(x, w, b, stride, padding, dilation)
    _forward_direct_kernel[cc.blocks(y.size, THREADS), THREADS](x, w, b, y, *args)
    return y


def _channel_rows(og: int) -> int:
    """Block height of the v2 kernels: TILE rows of output channels, or Og when a group has fewer.

    A U-Net's first layers have 4-16 channels; with TILE = 16 rows a 4-channel
    layer would launch 3 idle threads per busy one (on a GPU: wasted warps; in
    the simulator: 4x the Python threads). With R < TILE rows each thread
    stages TILE/R rows of the X tile instead of one.
    """
    return min(TILE, og)


def _forward_v2(x, w, b, stride, padding, dilation, groups):
    x, w, b, y, args = _forward_setup(x, w, b, stride, padding, dilation)
    c_out, cg, kh, kw = w.shape
    n, _, ho, wo = y.shape
    rows = _channel_rows(c_out // groups)
    grid = (cc.blocks(n * ho * wo, TILE), cc.blocks(c_out // groups, rows), groups)
    _forward_gemm_kernel[grid, (TILE, rows)](x, w.reshape(c_out, cg * kh * kw), b, y, *args, kh, kw)
    return y


# ------------------------------------------- register-tiled implicit GEMM (v3, v4)

# (BM, BN, BK, TM, TN): a block of (BM/TM)*(BN/TN) threads computes BM output
# channels x BN output pixels (forward; grad_weight: BM channels x BN taps), walking
# K in slices of BK; each thread owns a TM x TN register tile. Keyed by the
# smallest block height covering a group's channels (``_tiles_for``), so the
# thin layers of a U-Net do not run mostly idle rows: the block stays 256 threads.
TILES_V3 = {16: (16, 256, 16, 4, 4), 32: (32, 128, 16, 4, 4), 64: (64, 64, 16, 4, 4)}
TILES_V4 = {16: (16, 256, 16, 4, 4), 32: (32, 256, 8, 4, 8), 64: (64, 256, 8, 8, 8), 128: (128, 128, 8, 8, 8)}


# Under the simulator (one Python thread per CUDA thread, a thread switch per barrier)
# the default tiles are 64-thread blocks: with the 256-thread blocks above, the cuda
# U-Net step test took about twice as long as with v2 (a rough ratio on a loaded
# machine, not a timing); with these, about as long. The tests run the real tables explicitly.
SIMULATOR_TILES = (32, 32, 8, 4, 4)


def _default_tiles(table: dict, rows: int) -> tuple:
    """The tiles a version uses unless told: ``_tiles_for(table, rows)``, or SIMULATOR_TILES under the simulator."""
    return SIMULATOR_TILES if cc.SIMULATOR else _tiles_for(table, rows)


def _compiled_only(**options):
    """``cuda.jit`` options the simulator's ``jit`` does not accept (launch bounds, forced inlining)."""
    return {} if cc.SIMULATOR else options


def _tiles_for(table: dict, rows: int) -> tuple:
    """The tile configuration of ``table`` whose block height is the smallest >= ``rows`` (else the tallest)."""
    return table[min((h for h in table if h >= rows), default=max(table))]


def _threads(tiles) -> int:
    bm, bn, _, tm, tn = tiles
    return (bm // tm) * (bn // tn)


def _check_tiles(tiles) -> None:
    """The staging loops assume these (all powers of two in the tables); tests pass their own tiles."""
    bm, bn, bk, tm, tn = tiles
    threads = _threads(tiles)
    if bm % tm or bn % tn or threads % bm or threads % bn or threads % bk or bk * bn < threads:
        raise ValueError(f"tiles (BM, BN, BK, TM, TN) = {tiles}: need TM | BM, TN | BN, BM, BN, BK | threads <= BK*BN")


def _name(kernel, prefix: str, *key) -> None:
    """Name a factory kernel after its specialisation (PTX reports and profilers list it by this name)."""
    flat = "_".join(str(v).replace("-", "m") for k in key for v in (k if isinstance(k, tuple) else (k,)))
    kernel.__name__ = kernel.__qualname__ = f"{prefix}_{flat}"


@functools.cache
def _micro_tile(bk: int, tm: int, tn: int):
    """Device function: ``acc[u, v] += sum over t < BK of a_s[t, row, u] * b_s[t, col, v]``.

    The shared tiles are 3-D, (BK, rows, TM) and (BK, cols, TN): a thread's TM
    (TN) values are one 16- or 32-byte run, so NVVM emits 128-bit
    ``ld.shared.v4`` loads (with a flat 2-D index it cannot prove the alignment
    and emits scalar loads). Per t: TM + TN shared values, TM*TN FMAs.

    The body is generated straight-line (BK*(TM + TN) loads, BK*TM*TN ``cuda.fma``
    with constant indices). Written as ``for t in range(BK)``, NVVM unrolled the
    loop only 2x (4 x 4 tiles) or not at all (8 x 8), leaving a loop counter,
    Numba's negative-index wrap-around and address arithmetic in every step (with
    BK = 8 and 4 x 4 tiles, 43% of that loop's PTX instructions were FMAs). The
    straight-line body is nothing but the vector loads and the FMAs, and its
    constant indices keep the register tile in registers.
    """
    lines = ["def micro_tile(a_s, b_s, acc, row, col):"]
    for t in range(bk):
        lines += [f"    a{u} = a_s[{t}, row, {u}]" for u in range(tm)]
        lines += [f"    b{v} = b_s[{t}, col, {v}]" for v in range(tn)]
        lines += [f"    acc[{u}, {v}] = cuda.fma(a{u}, b{v}, acc[{u}, {v}])" for u in range(tm) for v in range(tn)]
    namespace = {"cuda": cuda}
    exec("\n".join(lines), namespace)  # noqa: S102 -- generated from the integers above only
    return cuda.jit(device=True, **_compiled_only(forceinline=True))(namespace["micro_tile"])


# Shared tiles aligned for 128-bit loads (the simulator rejects the argument).
_SMEM_ALIGN = None if cc.SIMULATOR else 16


@cuda.jit(device=True, **_compiled_only(forceinline=True))
def _at(a, i0, i1, i2, i3):
    """``a[i0, i1, i2, i3]`` for indices the caller has checked to be in range.

    Unsigned indices: Numba then skips its negative-index wrap-around (a compare
    and select per index). In the forward kernels' slice loops that removed
    6-12% of the PTX instructions (counted for sm_90, float32).
    """
    return a[types.uint64(i0), types.uint64(i1), types.uint64(i2), types.uint64(i3)]


@functools.cache
def _forward_tiled_kernel(kh, kw, sh, sw, pt, pl, dh, dw, tiles):
    """v3/v4 forward kernel for one geometry and tile configuration (compiled once, then cached).

    Launch: grid (ceil(M/BN), ceil(Og/BM), G), 1-D blocks of (BM/TM)*(BN/TN)
    threads; arguments (x, wt, b, y) with ``wt`` = w transposed to (kh, kw, Cg, C_out).
    """
    bm, bn, bk, tm, tn = tiles
    threads = _threads(tiles)
    x_loads, x_step = bk * bn // threads, threads // bn  # X values a thread stages per slice; their row step
    w_loads, w_step = max(1, bk * bm // threads), threads // bm
    w_stagers = bk * bm  # threads that stage W (all of them when BK*BM >= threads)
    cols = bn // tn
    xs_shape, ws_shape = (bk, cols, tn), (bk, bm // tm, tm)  # literal shapes for cuda.shared.array
    micro_tile = _micro_tile(bk, tm, tn)

    def kernel(x, wt, b, y):
        xs = cuda.shared.array(xs_shape, x.dtype, alignment=_SMEM_ALIGN)
        ws = cuda.shared.array(ws_shape, wt.dtype, alignment=_SMEM_ALIGN)
        rx = cuda.local.array(x_loads, x.dtype)  # the next slice, prefetched into registers
        rw = cuda.local.array(w_loads, wt.dtype)
        acc = cuda.local.array((tm, tn), y.dtype)
        zero = y.dtype.type(0)
        for u in range(tm):
            for v in range(tn):
                acc[u, v] = zero
        n_img, c_in, h_in, w_in = x.shape
        _, c_out, ho, wo = y.shape
        g = cuda.blockIdx.z
        cg = c_in // cuda.gridDim.z
        og = c_out // cuda.gridDim.z
        o0 = cuda.blockIdx.y * bm  # first channel of the tile, within the group
        m0 = cuda.blockIdx.x * bn  # first pixel m = (n, i, j) of the tile
        m_total = n_img * ho * wo
        tid = cuda.threadIdx.x
        # Everything that needs a run-time division is worked out once, here.
        # X staging: this thread's pixel (column) and first K row; its input window's corner.
        x_col = tid % bn
        x_row = tid // bn
        m = m0 + x_col
        n, i, j = cc.unravel3(m, ho, wo)
        pixel_ok = m < m_total
        h0 = i * sh - pt
        v0 = j * sw - pl
        # W staging: this thread's output channel (column) and first K row.
        w_col = tid % bm
        w_row = tid // bm
        o_w = o0 + w_col
        w_ok = o_w < og and tid < w_stagers
        # This thread's register tile: rows ty*TM.., columns tx*TN.. of the block tile.
        ty = tid // cols
        tx = tid % cols
        # K runs over the taps (p, q) and, inside each, slices of BK input channels:
        # advancing is a counter update (no division), and a slice's X rows are
        # channels of one input pixel. The last slice of a tap is partial when BK does not divide Cg.
        n_slices = kh * kw * ((cg + bk - 1) // bk)
        p = 0
        q = 0
        c0 = 0
        for s in range(n_slices + 1):
            if s < n_slices:  # fetch slice s into registers; the loads overlap the FMAs below
                h = h0 + p * dh
                v = v0 + q * dw
                inside = pixel_ok and 0 <= h < h_in and 0 <= v < w_in
                for r in range(x_loads):
                    c = c0 + x_row + r * x_step
                    rx[r] = _at(x, n, g * cg + c, h, v) if inside and c < cg else zero
                for r in range(w_loads):
                    c = c0 + w_row + r * w_step
                    rw[r] = _at(wt, p, q, c, g * og + o_w) if w_ok and c < cg else zero
            if s > 0:  # multiply slice s - 1, staged in shared memory
                micro_tile(ws, xs, acc, ty, tx)
                cuda.syncthreads()  # everyone done reading before the tiles are overwritten
            if s < n_slices:
                for r in range(x_loads):
                    xs[x_row + r * x_step, x_col // tn, x_col % tn] = rx[r]
                if tid < w_stagers:
                    for r in range(w_loads):
                        ws[w_row + r * w_step, w_col // tm, w_col % tm] = rw[r]
                c0 += bk
                if c0 >= cg:
                    c0 = 0
                    q += 1
                    if q == kw:
                        q = 0
                        p += 1
                cuda.syncthreads()  # tiles complete before anyone reads them
        # Write the register tile: TN consecutive pixels (a counter walks (n, i, j)) x TM channels.
        m = m0 + tx * tn
        n, i, j = cc.unravel3(m, ho, wo)
        for v in range(tn):
            if m + v < m_total:
                for u in range(tm):
                    o = o0 + ty * tm + u
                    if o < og:
                        y[n, g * og + o, i, j] = acc[u, v] + b[g * og + o]
            j += 1
            if j == wo:
                j = 0
                i += 1
                if i == ho:
                    i = 0
                    n += 1

    _name(kernel, "_forward_tiled", kh, kw, sh, sw, pt, pl, dh, dw, tiles)
    return cuda.jit(**_compiled_only(launch_bounds=threads))(kernel)


def _launch_forward_tiled(x, wt, b, y, geometry, groups, tiles):
    """y = conv2d(x, w) + b through the v3/v4 kernel; ``wt`` is w as (kh, kw, Cg, C_out), ``geometry``
    (sh, sw, pt, pl, dh, dw) (any padding, also negative: y's shape alone sets Ho, Wo)."""
    _check_tiles(tiles)
    bm, bn = tiles[:2]
    n, c_out, ho, wo = y.shape
    kernel = _forward_tiled_kernel(wt.shape[0], wt.shape[1], *geometry, tiles)
    grid = (cc.blocks(n * ho * wo, bn), cc.blocks(c_out // groups, bm), groups)
    kernel[grid, _threads(tiles)](x, wt, b, y)
    return y


def _forward_tiled(table, x, w, b, stride, padding, dilation, groups, tiles=None):
    """v3/v4: the tiles come from ``table`` unless given (tests pass small ones)."""
    x, w, b, y, args = _forward_setup(x, w, b, stride, padding, dilation)
    wt = cc.as_input(w.transpose(2, 3, 1, 0))  # (kh, kw, Cg, C_out): a slice's channels are contiguous
    tiles = tiles or _default_tiles(table, w.shape[0] // groups)
    return _launch_forward_tiled(x, wt, b, y, args, groups, tiles)


def _forward_v3(x, w, b, stride, padding, dilation, groups, tiles=None):
    return _forward_tiled(TILES_V3, x, w, b, stride, padding, dilation, groups, tiles)


def _forward_v4(x, w, b, stride, padding, dilation, groups, tiles=None):
    return _forward_tiled(TILES_V4, x, w, b, stride, padding, dilation, groups, tiles)


FORWARD_VERSIONS = {1: _forward_v1, 2: _forward_v2, 3: _forward_v3, 4: _forward_v4}
DEFAULT_FORWARD_VERSION = 4  # measured faster than v3 on all three benchmark shapes (module docstring)


def conv2d_forward(x, w, b, stride, padding, dilation, groups, version=DEFAULT_FORWARD_VERSION):
    """y (N, C_out, Ho, Wo); ``version`` picks a kernel of FORWARD_VERSIONS (see the module docstring)."""
    return FORWARD_VERSIONS[version](x, w, b, stride, padding, dilation, groups)


# ----------------------------------------------------------------------- backward


@cuda.jit(device=True, **_compiled_only(forceinline=True))
def _gather_grad_input(gy, w, gx, e, kh, kw, sh, sw, pt, pl, dh, dw):
    """gx.flat[e], gathered over the taps that read it (see the module docstring).

    Shared by v1 (geometry passed at run time) and v3's stride > 1 kernels (the
    geometry compile-time constants: after inlining, ``% sh`` and ``// sh``
    become shifts or multiplications, and the tap loops have constant trip counts).
    """
    _, c_in, h_in, w_in = gx.shape
    _, c_out, ho, wo = gy.shape
    cg = w.shape[1]
    n, c, h, v = cc.unravel4(e, c_in, h_in, w_in)
    og = c_out // (c_in // cg)
    o0 = (c // cg) * og  # first output channel of c's group ...
    cw = c % cg  # ... and c's index in their weights
    acc = gx.dtype.type(0)
    for p in range(kh):
        # Output row i reads row h through tap p iff i*sh = h + pt - p*dh.
        ri = h + pt - p * dh
        if ri < 0:
            break  # ri only falls as p grows
        if ri % sh != 0 or ri // sh >= ho:
            continue
        i = ri // sh
        for q in range(kw):
            rj = v + pl - q * dw
            if rj < 0:
                break
            if rj % sw != 0 or rj // sw >= wo:
                continue
            j = rj // sw
            for o in range(o0, o0 + og):
                acc += w[o, cw, p, q] * gy[n, o, i, j]
    gx[n, c, h, v] = acc


@cuda.jit
def _grad_input_kernel(gy, w, gx, sh, sw, pt, pl, dh, dw):
    """v1: thread e computes gx.flat[e] by gathering over the taps that read it."""
    e = cuda.grid(1)
    if e < gx.size:
        _gather_grad_input(gy, w, gx, e, w.shape[2], w.shape[3], sh, sw, pt, pl, dh, dw)


@functools.cache
def _grad_input_gather_kernel(kh, kw, sh, sw, pt, pl, dh, dw):
    """v3 for stride > 1: v1's gather with the geometry compile-time (cached per geometry)."""

    def kernel(gy, w, gx):
        e = cuda.grid(1)
        if e < gx.size:
            _gather_grad_input(gy, w, gx, e, kh, kw, sh, sw, pt, pl, dh, dw)

    _name(kernel, "_grad_input_gather", kh, kw, sh, sw, pt, pl, dh, dw)
    # The gather is bound by memory latency, which more resident warps hide: with
    # launch bounds of THREADS alone ptxas took 110 registers (4 blocks per SM);
    # 5 blocks caps it at 102 (it takes 90-92; 6 blocks' cap of 80 spilled).
    return cuda.jit(**_compiled_only(launch_bounds=(THREADS, GATHER_MIN_BLOCKS)))(kernel)


def _grad_input_v1(gy, w, x_shape, stride, padding, dilation, groups):
    gy, w = _float_inputs(gy, w)
    gx = cc.empty(tuple(x_shape), gy.dtype)
    (pt, _), (pl, _) = padding
    _grad_input_kernel[cc.blocks(gx.size, THREADS), THREADS](
        gy, w, gx, stride[0], stride[1], pt, pl, dilation[0], dilation[1]
    )
    return gx


def _flipped_weights(w, groups):
    """w (C_out, Cg, kh, kw) as the forward weights of grad_input: wt' (kh, kw, Og, C_in) with
    ``wt'[p', q', o, g*Cg + c] = w[g*Og + o, c, kh-1-p', kw-1-q']`` (taps flipped, in/out swapped per group)."""
    c_out, cg, kh, kw = w.shape
    og = c_out // groups
    flipped = w.reshape(groups, og, cg, kh, kw)[:, :, :, ::-1, ::-1]
    return cc.as_input(flipped.transpose(3, 4, 1, 0, 2)).reshape(kh, kw, og, groups * cg)


def _grad_input_v3(gy, w, x_shape, stride, padding, dilation, groups, tiles=None):
    """Stride 1: v3's forward on gy (see the module docstring); otherwise the compile-time gather."""
    gy, w = _float_inputs(gy, w)
    gx = cc.empty(tuple(x_shape), gy.dtype)
    (pt, _), (pl, _) = padding
    _, cg, kh, kw = w.shape
    (dh, dw), (sh, sw) = dilation, stride
    if (sh, sw) == (1, 1):
        # gx[h] = sum_p' w'[p'] gy[h - pt' + p'*dh] with p' = kh-1-p and pt' = dh*(kh-1) - pt
        # (negative when the padding reaches past the kernel: the bounds checks handle it).
        geometry = (1, 1, dh * (kh - 1) - pt, dw * (kw - 1) - pl, dh, dw)
        tiles = tiles or _default_tiles(TILES_V3, cg)
        zero_bias = cc.zeros((gx.shape[1],), gx.dtype)
        return _launch_forward_tiled(gy, _flipped_weights(w, groups), zero_bias, gx, geometry, groups, tiles)
    kernel = _grad_input_gather_kernel(kh, kw, sh, sw, pt, pl, dh, dw)
    kernel[cc.blocks(gx.size, THREADS), THREADS](gy, w, gx)
    return gx


GRAD_INPUT_VERSIONS = {1: _grad_input_v1, 3: _grad_input_v3}
DEFAULT_GRAD_INPUT_VERSION = 3


def conv2d_grad_input(gy, w, x_shape, stride, padding, dilation, groups, version=DEFAULT_GRAD_INPUT_VERSION):
    """gx (x_shape): the adjoint of the forward in x; ``version`` picks a kernel of GRAD_INPUT_VERSIONS."""
    return GRAD_INPUT_VERSIONS[version](gy, w, x_shape, stride, padding, dilation, groups)


@cuda.jit
def _grad_weight_reduce_kernel(x, gy, gw, sh, sw, pt, pl, dh, dw):
    """v1: block e computes gw.flat[e] = sum over (n, i, j) of gy * the input pixel its tap read."""
    buf = cuda.shared.array(REDUCE_THREADS, dtype=gw.dtype)
    e = cuda.blockIdx.x
    c_out, cg, kh, kw = gw.shape
    n_img, c_in, h_in, w_in = x.shape
    _, _, ho, wo = gy.shape
    o, c, p, q = cc.unravel4(e, cg, kh, kw)
    ci = (o // (c_out // (c_in // cg))) * cg + c  # the input channel this weight reads
    acc = gw.dtype.type(0)
    for m in range(cuda.threadIdx.x, n_img * ho * wo, cuda.blockDim.x):
        j = m % wo
        i = (m // wo) % ho
        n = m // (wo * ho)
        h = i * sh - pt + p * dh
        v = j * sw - pl + q * dw
        if 0 <= h < h_in and 0 <= v < w_in:
            acc += gy[n, o, i, j] * x[n, ci, h, v]
    total = cc.block_sum(acc, buf)
    if cuda.threadIdx.x == 0:
        gw[o, c, p, q] = total


@cuda.jit
def _grad_weight_gemm_kernel(x, gy, part, sh, sw, pt, pl, dh, dw, kh, kw):
    """v2: block (bx, by, z) computes part[s, o, k] for o = g*Og + by*R + ty, k = bx*TILE + tx.

    The block is TILE x R with R = blockDim.y <= TILE rows of channels (see
    ``_channel_rows``). ``part`` is (S, C_out, K): split s of S sums the m of
    its own range of M-slices, and z = g*S + s. Thread (tx, ty) stages
    gy[o0 + ty, m0 + tx] and the rows X[k0 + r, m0 + tx], r = ty, ty + R, ... < TILE,
    of each M-slice, so both loads have tx on the contiguous pixel axis; X goes
    into ``xs`` transposed (m, k), so the inner loop reads ``xs[t, tx]`` at
    consecutive addresses as in the forward.
    """
    gys = cuda.shared.array((TILE, TILE), dtype=gy.dtype)
    # One padding column (TILE_PADDED = TILE + 1): the transposed store xs[tx, r]
    # then steps TILE + 1 words per tx, so a warp's stores spread over the banks
    # (at most 2-way conflicts) instead of piling TILE-way onto a few.
    xs = cuda.shared.array((TILE, TILE_PADDED), dtype=x.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    zero = x.dtype.type(0)
    n_img, c_in, h_in, w_in = x.shape
    _, c_out, ho, wo = gy.shape
    splits, _, k_total = part.shape
    g = cuda.blockIdx.z // splits
    s = cuda.blockIdx.z % splits
    cg = c_in // (cuda.gridDim.z // splits)
    og = c_out // (cuda.gridDim.z // splits)
    m_total = n_img * ho * wo
    # Split s covers whole tiles [m_begin, m_end) of M; the last split may be short or empty.
    m_per_split = TILE * ((m_total + splits * TILE - 1) // (splits * TILE))
    m_begin = s * m_per_split
    m_end = min(m_total, m_begin + m_per_split)
    rows = cuda.blockDim.y
    o_in_group = cuda.blockIdx.y * rows + ty  # the gy row this thread loads and the gw row it computes
    o = g * og + o_in_group
    k0 = cuda.blockIdx.x * TILE
    acc = zero
    for m0 in range(m_begin, m_end, TILE):
        m = m0 + tx
        j = m % wo
        i = (m // wo) % ho
        n = m // (wo * ho)
        gys[ty, tx] = gy[n, o, i, j] if o_in_group < og and m < m_end else zero
        for r in range(ty, TILE, rows):  # X rows: taps k = (c, p, q)
            k = k0 + r
            val = zero
            if k < k_total and m < m_end:
                c = k // (kh * kw)
                p = (k // kw) % kh
                q = k % kw
                h = i * sh - pt + p * dh
                v = j * sw - pl + q * dw
                if 0 <= h < h_in and 0 <= v < w_in:
                    val = x[n, g * cg + c, h, v]
            xs[tx, r] = val
        cuda.syncthreads()  # tiles complete before anyone reads them
        for t in range(TILE):
            acc += gys[ty, t] * xs[t, tx]
        cuda.syncthreads()  # everyone done reading before the next slice overwrites them
    if o_in_group < og and k0 + tx < k_total:
        part[s, o, k0 + tx] = acc


def _grad_weight_setup(x, gy, padding):
    """Checked inputs, the number N*Ho*Wo of terms per weight, and the top/left padding."""
    x, gy = _float_inputs(x, gy)
    n, _, ho, wo = gy.shape  # gy's own size: conv_transpose2d's output_padding may have trimmed it
    return x, gy, n * ho * wo, padding[0][0], padding[1][0]


def _grad_weight_v1(x, gy, w_shape, stride, padding, dilation, groups):
    x, gy, m_total, pt, pl = _grad_weight_setup(x, gy, padding)
    gw = cc.empty(tuple(w_shape), x.dtype)
    _grad_weight_reduce_kernel[gw.size, cc.reduce_threads(m_total, REDUCE_THREADS)](
        x, gy, gw, stride[0], stride[1], pt, pl, dilation[0], dilation[1]
    )
    return gw


def _grad_weight_splits(blocks: int, m_total: int, slice_width: int = TILE) -> int:
    """How many slices of M v2 sums in separate blocks (split-K), for a grid of ``blocks`` tiles.

    A layer with few output channels and taps but large images is a handful of
    tiles each running a long loop over M: too few blocks to fill a GPU. Split
    M until there are about SPLIT_TARGET_BLOCKS blocks, keeping at least
    SPLIT_MIN_TILES M-slices per split so the extra partial sums stay cheap.
    Under the simulator always 1: a split only multiplies Python threads.
    """
    if cc.SIMULATOR:
        return 1
    return cc.splits(blocks, m_total, slice_width * SPLIT_MIN_TILES, SPLIT_TARGET_BLOCKS)


def _grad_weight_v2(x, gy, w_shape, stride, padding, dilation, groups, splits=None):
    """``splits`` (default: ``_grad_weight_splits``) is a parameter so tests can exercise split-K."""
    x, gy, m_total, pt, pl = _grad_weight_setup(x, gy, padding)
    c_out, cg, kh, kw = w_shape
    k_total = cg * kh * kw
    rows = _channel_rows(c_out // groups)
    tiles = (cc.blocks(k_total, TILE), cc.blocks(c_out // groups, rows))
    if splits is None:
        splits = _grad_weight_splits(tiles[0] * tiles[1] * groups, m_total)
    part = cc.empty((splits, c_out, k_total), x.dtype)
    _grad_weight_gemm_kernel[(*tiles, groups * splits), (TILE, rows)](
        x, gy, part, stride[0], stride[1], pt, pl, dilation[0], dilation[1], kh, kw
    )
    # Adding the S partials is a fixed-order array sum: deterministic, unlike atomics.
    gw = part[0] if splits == 1 else part.sum(axis=0)
    return gw.reshape(tuple(w_shape))



@functools.cache
def _grad_weight_tiled_kernel(kh, kw, sh, sw, pt, pl, dh, dw, tiles, with_bias):
    """v3 grad_weight kernel for one geometry and tile configuration (compiled once, then cached).

    Block (bx, by, z = g*S + s) computes the register tiles of part[s, o, k] for
    BM channels o (group g) x BN taps k = (c, p, q), summing split s's share of
    the pixel slices; with ``with_bias`` the blocks of the first tap column also
    sum gy into part_b[s, o]. 1-D blocks of (BM/TM)*(BN/TN) threads.
    """
    bm, bn, bk, tm, tn = tiles
    threads = _threads(tiles)
    step = threads // bk  # a staging thread's column step between its loads
    g_loads, g_stagers = max(1, bk * bm // threads), bk * bm
    x_loads = bk * bn // threads
    cols = bn // tn
    # One padding register-run per row: the staging stores [r, col] of BK
    # neighbouring threads then fall into different banks, and rows stay 16-byte aligned.
    gys_shape, xs_shape = (bk, bm // tm + 1, tm), (bk, cols + 1, tn)
    micro_tile = _micro_tile(bk, tm, tn)

    def kernel(x, gy, part, part_b):
        gys = cuda.shared.array(gys_shape, gy.dtype, alignment=_SMEM_ALIGN)
        xs = cuda.shared.array(xs_shape, x.dtype, alignment=_SMEM_ALIGN)
        rg = cuda.local.array(g_loads, gy.dtype)  # the next slice, prefetched into registers
        rx = cuda.local.array(x_loads, x.dtype)
        tap_chan = cuda.local.array(x_loads, types.int32)  # per staged tap: input channel (-1: past K) ...
        tap_h = cuda.local.array(x_loads, types.int32)  # ... and its row/column offsets p*dh - pt, q*dw - pl
        tap_v = cuda.local.array(x_loads, types.int32)
        acc = cuda.local.array((tm, tn), part.dtype)
        bias = cuda.local.array(g_loads, part.dtype)  # with_bias: sums of the gy values this thread stages
        zero = part.dtype.type(0)
        for u in range(tm):
            for v in range(tn):
                acc[u, v] = zero
        for t in range(g_loads):
            bias[t] = zero
        n_img, c_in, h_in, w_in = x.shape
        _, c_out, ho, wo = gy.shape
        splits, _, k_total = part.shape
        g = cuda.blockIdx.z // splits
        s = cuda.blockIdx.z % splits
        cg = c_in // (cuda.gridDim.z // splits)
        og = c_out // (cuda.gridDim.z // splits)
        o0 = cuda.blockIdx.y * bm
        k0 = cuda.blockIdx.x * bn
        tid = cuda.threadIdx.x
        ty = tid // cols
        tx = tid % cols
        # Staging: this thread's pixel column r of a slice, and the channels / taps it stages.
        r = tid % bk
        col = tid // bk
        for t in range(x_loads):
            k = k0 + col + t * step
            c = k // (kh * kw)  # once per thread, by constants: no division in the pixel loop
            pq = k - c * (kh * kw)
            tap_chan[t] = g * cg + c if k < k_total else -1
            tap_h[t] = (pq // kw) * dh - pt
            tap_v[t] = (pq % kw) * dw - pl
        # M runs over (n, i) rows and, inside each, slices of BK output columns j;
        # split s takes the slices [first, last). Advancing is a counter update.
        row_slices = (wo + bk - 1) // bk
        n_slices = n_img * ho * row_slices
        per_split = (n_slices + splits - 1) // splits
        first = s * per_split
        last = min(n_slices, first + per_split)
        n, i, j0 = cc.unravel3(first, ho, row_slices)
        j0 *= bk
        for sl in range(first, last + 1):
            if sl < last:  # fetch slice sl into registers; the loads overlap the FMAs below
                j = j0 + r
                in_row = j < wo
                for t in range(g_loads):
                    o = o0 + col + t * step
                    ok = in_row and o < og and tid < g_stagers
                    rg[t] = _at(gy, n, g * og + o, i, j) if ok else zero
                    if with_bias:
                        bias[t] += rg[t]
                for t in range(x_loads):
                    h = i * sh + tap_h[t]
                    v = j * sw + tap_v[t]
                    ok = in_row and tap_chan[t] >= 0 and 0 <= h < h_in and 0 <= v < w_in
                    rx[t] = _at(x, n, tap_chan[t], h, v) if ok else zero
            if sl > first:  # multiply slice sl - 1, staged in shared memory
                micro_tile(gys, xs, acc, ty, tx)
                cuda.syncthreads()  # everyone done reading before the tiles are overwritten
            if sl < last:
                if tid < g_stagers:
                    for t in range(g_loads):
                        o = col + t * step
                        gys[r, o // tm, o % tm] = rg[t]
                for t in range(x_loads):
                    k = col + t * step
                    xs[r, k // tn, k % tn] = rx[t]
                j0 += bk
                if j0 >= wo:
                    j0 = 0
                    i += 1
                    if i == ho:
                        i = 0
                        n += 1
                cuda.syncthreads()  # tiles complete before anyone reads them
        for u in range(tm):
            o = o0 + ty * tm + u
            if o < og:
                for v in range(tn):
                    k = k0 + tx * tn + v
                    if k < k_total:
                        part[s, g * og + o, k] = acc[u, v]
        if with_bias and cuda.blockIdx.x == 0:  # (the whole block takes this branch: its barrier is safe)
            # The BK threads that staged channel o's values hold its partial sums:
            # add them through the (now idle) gy tile in a fixed order.
            if tid < g_stagers:
                for t in range(g_loads):
                    o = col + t * step
                    gys[r, o // tm, o % tm] = bias[t]
            cuda.syncthreads()
            if tid < bm and o0 + tid < og:
                total = zero
                for t in range(bk):
                    total += gys[t, tid // tm, tid % tm]
                part_b[s, g * og + o0 + tid] = total

    _name(kernel, "_grad_weight_tiled", kh, kw, sh, sw, pt, pl, dh, dw, tiles, int(with_bias))
    return cuda.jit(**_compiled_only(launch_bounds=threads))(kernel)


@cuda.jit
def _sum_splits_kernel(part, total):
    """total[e] = part[0, e] + part[1, e] + ... in split order: a fixed order, so the sum is deterministic."""
    e = cuda.grid(1)
    if e < total.size:
        acc = part[0, e]
        for s in range(1, part.shape[0]):
            acc += part[s, e]
        total[e] = acc


def _sum_splits(part):
    """(S, ...) partial sums -> their sum over S (part[0] itself when S = 1)."""
    if part.shape[0] == 1:
        return part[0]
    flat = part.reshape(part.shape[0], -1)
    total = cc.empty((flat.shape[1],), part.dtype)
    _sum_splits_kernel[cc.blocks(total.size, THREADS), THREADS](flat, total)
    return total.reshape(part.shape[1:])


def _grad_weight_tiled(x, gy, w_shape, stride, padding, dilation, groups, tiles=None, splits=None, with_bias=False):
    """v3: gw, and gb when ``with_bias`` (else None). ``tiles`` and ``splits`` are parameters for the tests."""
    x, gy, _, pt, pl = _grad_weight_setup(x, gy, padding)
    c_out, cg, kh, kw = w_shape
    og, k_total = c_out // groups, cg * kh * kw
    tiles = tiles or _default_tiles(TILES_V3, og)
    _check_tiles(tiles)
    bm, bn, bk = tiles[:3]
    grid = (cc.blocks(k_total, bn), cc.blocks(og, bm))
    if splits is None:
        n, _, ho, wo = gy.shape
        splits = _grad_weight_splits(grid[0] * grid[1] * groups, n * ho * cc.blocks(wo, bk) * bk, bk)
    part = cc.empty((splits, c_out, k_total), x.dtype)
    part_b = cc.empty((splits, c_out) if with_bias else (1, 1), x.dtype)
    kernel = _grad_weight_tiled_kernel(kh, kw, *stride, pt, pl, *dilation, tiles, with_bias)
    kernel[(*grid, groups * splits), _threads(tiles)](x, gy, part, part_b)
    gw = _sum_splits(part).reshape(tuple(w_shape))
    return gw, (_sum_splits(part_b) if with_bias else None)


def _grad_weight_v3(x, gy, w_shape, stride, padding, dilation, groups, tiles=None, splits=None):
    return _grad_weight_tiled(x, gy, w_shape, stride, padding, dilation, groups, tiles, splits)[0]


def conv2d_grad_weight_bias(x, gy, w_shape, stride, padding, dilation, groups, tiles=None, splits=None):
    """(gw, gb) in one pass of grad_weight v3: gb = gy summed over (n, i, j), as ``conv2d_grad_bias``."""
    return _grad_weight_tiled(x, gy, w_shape, stride, padding, dilation, groups, tiles, splits, with_bias=True)


GRAD_WEIGHT_VERSIONS = {1: _grad_weight_v1, 2: _grad_weight_v2, 3: _grad_weight_v3}
DEFAULT_GRAD_WEIGHT_VERSION = 3


def conv2d_grad_weight(x, gy, w_shape, stride, padding, dilation, groups, version=DEFAULT_GRAD_WEIGHT_VERSION):
    """gw (w_shape); ``version`` picks a kernel of GRAD_WEIGHT_VERSIONS (see the module docstring)."""
    return GRAD_WEIGHT_VERSIONS[version](x, gy, w_shape, stride, padding, dilation, groups)


def conv2d_grad_bias(gy):
    """gb (C_out,) = gy summed over (n, i, j): ``cuda_common.channel_sums``, a grid of channels x splits
    with warp-shuffle block sums and a fixed-order pass over the splits (deterministic)."""
    (gy,) = _float_inputs(gy)
    n, c_out, ho, wo = gy.shape
    return cc.channel_sums(gy.reshape(n, c_out, ho * wo))[0]


# ------------------------------------------------------------ PTX compile targets


def _signatures(template: str) -> list[str]:
    """PTX signatures for float32 and float64; {A} is a C-contiguous 4-D float array."""
    return cc.float_signatures(template, A="{t}[:, :, :, ::1]")


PTX_SIGNATURES = [
    (_forward_direct_kernel, _signatures("void({A}, {A}, {t}[::1], {A}, int64, int64, int64, int64, int64, int64)")),
    (
        _forward_gemm_kernel,
        _signatures("void({A}, {t}[:, ::1], {t}[::1], {A}, int64, int64, int64, int64, int64, int64, int64, int64)"),
    ),
    (_grad_input_kernel, _signatures("void({A}, {A}, {A}, int64, int64, int64, int64, int64, int64)")),
    (_sum_splits_kernel, _signatures("void({t}[:, ::1], {t}[::1])")),
    (_grad_weight_reduce_kernel, _signatures("void({A}, {A}, {A}, int64, int64, int64, int64, int64, int64)")),
    (
        _grad_weight_gemm_kernel,
        _signatures("void({A}, {A}, {t}[:, :, ::1], int64, int64, int64, int64, int64, int64, int64, int64)"),
    ),
    (cc.channel_sums_kernel, cc.CHANNEL_SUMS_SIGNATURES),
    (cc.sum_splits_kernel, cc.SUM_SPLITS_SIGNATURES),
]

# The factory kernels (v3, v4) exist per geometry; these representative
# specialisations -- a U-Net's 3x3 stride 1, a 3x3 stride-2 downsampling, a 1x1
# head, with the default tile tables -- are what the PTX test and report compile.
# geometry: (kh, kw, sh, sw, pt, pl, dh, dw)
_PTX_GEOMETRIES = {"3x3": (3, 3, 1, 1, 1, 1, 1, 1), "3x3/2": (3, 3, 2, 2, 1, 1, 1, 1), "1x1": (1, 1, 1, 1, 0, 0, 1, 1)}
_FORWARD_TILED_SIG = _signatures("void({A}, {A}, {t}[::1], {A})")
_GRAD_WEIGHT_TILED_SIG = _signatures("void({A}, {A}, {t}[:, :, ::1], {t}[:, ::1])")
PTX_SIGNATURES += [
    (_forward_tiled_kernel(*_PTX_GEOMETRIES["3x3"], TILES_V3[64]), _FORWARD_TILED_SIG),
    (_forward_tiled_kernel(*_PTX_GEOMETRIES["3x3"], TILES_V3[16]), _FORWARD_TILED_SIG),
    (_forward_tiled_kernel(*_PTX_GEOMETRIES["3x3/2"], TILES_V3[64]), _FORWARD_TILED_SIG),
    (_forward_tiled_kernel(*_PTX_GEOMETRIES["1x1"], TILES_V3[32]), _FORWARD_TILED_SIG),
    (_forward_tiled_kernel(*_PTX_GEOMETRIES["3x3"], TILES_V4[128]), _FORWARD_TILED_SIG),
    (_grad_input_gather_kernel(*_PTX_GEOMETRIES["3x3/2"]), _signatures("void({A}, {A}, {A})")),
    (_grad_weight_tiled_kernel(*_PTX_GEOMETRIES["3x3"], TILES_V3[64], True), _GRAD_WEIGHT_TILED_SIG),
    (_grad_weight_tiled_kernel(*_PTX_GEOMETRIES["1x1"], TILES_V3[16], False), _GRAD_WEIGHT_TILED_SIG),
]
