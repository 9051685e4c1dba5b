"""What every ``kernels/<op>/cuda.py`` shares: array module, allocation, launch sizes,
and the building blocks of the per-channel reductions (warp shuffles, Chan's
merge, channels x splits grids with a fixed-order second pass; see "reductions
v2" below).

On a GPU the cuda backend's arrays are CuPy arrays, handed to Numba kernels
through ``__cuda_array_interface__`` (no copies). Without a GPU, Numba's CUDA
simulator runs the same kernels on NumPy arrays: every CUDA thread becomes a
Python thread, so keep test launches to about 10k threads.

Every cuda.py module lists its kernels with the signatures they must compile
for in ``PTX_SIGNATURES`` -- ``[(kernel, ["void(float32[:, ::1], ...)", ...]), ...]``
-- and ``tests/cuda/test_ptx.py`` compiles each of them to PTX for sm_80 and
sm_90 with the simulator off, because the simulator happily runs Python that
real CUDA rejects. ``python -m benchmarks.ptx_report`` does the same compile
and prints each kernel's registers, spills and shared memory.

Under the simulator, ``minseg.runtime.fix_simulator_shared_arrays`` (applied when
the cuda backend loads, and by the tests) makes ``cuda.shared.array`` thread-safe.

The simulator copies NumPy arguments to fake device arrays and back after the
launch (so a kernel's writes appear in the caller's arrays), and refuses
non-contiguous arrays: pass everything through ``as_input``.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import config, cuda, float64

SIMULATOR = bool(config.ENABLE_CUDASIM)


if SIMULATOR:
    xp = np
else:  # a real GPU: arrays live in CuPy
    try:
        import cupy as xp
    except ImportError:  # compile-only use (PTX checks) without CuPy
        xp = np

# Poison fresh outputs (NaN for floats, a huge value for ints) so a kernel that
# forgets to write an element fails its test instead of passing on zeros that
# happened to be in memory. Always on under the simulator; MINSEG_POISON=1 turns
# it on for a real GPU run of the tests.
POISON = SIMULATOR or os.environ.get("MINSEG_POISON") == "1"


def empty(shape, dtype):
    """A fresh output array (poisoned when POISON is set)."""
    out = xp.empty(shape, dtype=dtype)
    if POISON:
        out.fill(np.nan if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max)
    return out


def zeros(shape, dtype):
    return xp.zeros(shape, dtype=dtype)


def as_input(a, dtype=None):
    """A C-contiguous device array of ``dtype`` (kernels index flat memory)."""
    a = xp.asarray(a)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return xp.ascontiguousarray(a)


def blocks(n: int, threads: int) -> int:
    """Number of blocks so that blocks*threads >= n (the last block is partial)."""
    return max(1, math.ceil(n / threads))


def float_signatures(template: str, **arrays: str) -> list[str]:
    """PTX signatures of ``template`` for float32 and for float64.

    ``{t}`` in the template is the float type; every keyword names another
    placeholder, itself written with ``{t}`` (e.g. ``A="{t}[:, :, :, ::1]"``, a
    C-contiguous 4-D array of the float type).
    """
    return [template.format(t=t, **{k: v.format(t=t) for k, v in arrays.items()}) for t in ("float32", "float64")]


def reduce_threads(terms: int, largest: int) -> int:
    """Block size of a block reduction over ``terms`` values: a power of two in [32, largest].

    A block no larger than the work leaves no threads idle on short reductions
    (and keeps the simulator, one Python thread per CUDA thread, fast); ``largest``
    is the size of the kernel's shared buffer.
    """
    if SIMULATOR:
        # One Python thread per CUDA thread, and a barrier costs a switch per
        # thread: the smallest block (one warp) switches through 4x fewer threads
        # per barrier than a 128-thread block, and has 2 barriers fewer (an
        # estimate from the thread counts, not a timing). The code path is
        # identical for any size.
        return 32
    threads = 32
    while threads < min(terms, largest):
        threads *= 2
    return threads


@cuda.jit(device=True)
def unravel4(e, d1, d2, d3):
    """(a, b, c, d) with e = ((a*d1 + b)*d2 + c)*d3 + d: a flat C-order index of a 4-D array.

    One thread per element numbers the elements in memory order, so neighbouring
    threads touch neighbouring addresses (coalesced) and every kernel maps its
    thread index back to coordinates the same way.
    """
    return e // (d3 * d2 * d1), (e // (d3 * d2)) % d1, (e // d3) % d2, e % d3


@cuda.jit(device=True)
def unravel3(e, d1, d2):
    """(a, b, c) with e = (a*d1 + b)*d2 + c: a flat C-order index of a 3-D array."""
    return e // (d2 * d1), (e // d2) % d1, e % d2


@cuda.jit(device=True)
def block_sum(value, buf):
    """Sum of ``value`` over the threads of a 1-D block, returned to every thread.

    ``buf`` is a shared array with one slot per thread (blockDim.x a power of two).
    Tree reduction: each step adds the upper half of ``buf`` onto the lower half,
    log2(blockDim.x) steps with a barrier after each. The barrier after reading
    the total lets a kernel call block_sum again with the same ``buf``.
    """
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if t < half:
            buf[t] += buf[t + half]
        cuda.syncthreads()
        half //= 2
    total = buf[0]
    cuda.syncthreads()
    return total


# ------------------------------------------------------------------ reductions v2
#
# A per-channel sum over N*H*W values (batch-norm statistics and parameter
# gradients, conv grad_bias, the cross-entropy 'mean') needs three things to use
# a whole GPU:
#
# 1. enough blocks: a grid of channels x splits, each block summing one split
#    (a contiguous range) of its channel, with at least TARGET_BLOCKS blocks in
#    all (``splits``), so no SM idles even with 16 channels;
# 2. enough loads in flight: each thread issues UNROLL independent loads before
#    it adds them (a memory-bound loop waits on latency otherwise);
# 3. a cheap combine: inside a warp, registers are exchanged with shuffles
#    (``cuda.shfl_down_sync``: no shared memory, no barrier); across the warps of
#    a block, one shared slot per warp and one barrier.
#
# The blocks' partial results go to a small (quantity, channel, split) array, and
# a second pass adds the splits of each channel in a fixed order. Floating-point
# addition is not associative, so atomics (whose order varies from run to run)
# would make the result differ in the last bits between runs; the fixed order
# makes every run bit-identical. All partial sums are float64.
#
# Under the simulator, ``minseg.runtime.simulate_warp_shuffles`` provides the
# shuffle that numba-cuda's simulator lacks.

WARP = 32
FULL_MASK = 0xFFFFFFFF  # every lane of the warp takes part in the shuffle
UNROLL = 4  # independent loads in flight per thread per step
REDUCE_BLOCK = 128  # threads of a split-reduction block (4 warps; 32 under the simulator)
TARGET_BLOCKS = 2 * 132  # an estimate: two blocks per SM of a 132-SM H100, enough to hide a block's tail


def split_threads() -> int:
    """Threads of a split-reduction block: REDUCE_BLOCK, one warp under the simulator (one Python thread each)."""
    return WARP if SIMULATOR else REDUCE_BLOCK


def splits(groups: int, length: int, min_per_split: int, target: int = TARGET_BLOCKS) -> int:
    """Splits of each group's ``length`` values so the grid has >= ``target`` blocks, each split
    keeping >= ``min_per_split`` values (a reduction's block: threads * UNROLL)."""
    wanted = -(-target // max(groups, 1))
    most = max(1, -(-length // min_per_split))
    return max(1, min(wanted, most))


def split_range(length: int, n_splits: int) -> int:
    """The length of one split: ``n_splits`` ranges of this length (the last shorter) cover ``length``."""
    return max(1, -(-length // n_splits))


@cuda.jit(device=True)
def warp_sum(value):
    """Sum of ``value`` over the 32 lanes of a warp, complete in lane 0.

    Five shuffle steps: lane l adds lane l+16's value, then l+8's, ..., l+1's;
    after them lane 0 holds all 32 (the other lanes hold partial sums).
    """
    offset = WARP // 2
    while offset > 0:
        value += cuda.shfl_down_sync(FULL_MASK, value, offset)
        offset //= 2
    return value


@cuda.jit(device=True)
def block_total(value, warp_slots):
    """Sum of ``value`` over a 1-D block (a whole number of warps, at most 32), complete in thread 0.

    Each warp reduces with shuffles, lane 0 of each warp puts its total into
    ``warp_slots`` (a shared array of WARP slots), and warp 0 adds the slots. The
    barrier at the end lets the caller reuse ``warp_slots`` right away.
    """
    t = cuda.threadIdx.x
    lane = t % WARP
    value = warp_sum(value)
    if lane == 0:
        warp_slots[t // WARP] = value
    cuda.syncthreads()
    total = value
    if t < WARP:
        total = warp_sum(warp_slots[lane] if lane < cuda.blockDim.x // WARP else warp_slots.dtype.type(0))
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(count, mean, M2) of the union of two sets from each set's own (Chan et al., 1979).

    M2 is the sum of squared deviations from the mean (var = M2 / count). With
    n = n_a + n_b and d = mean_b - mean_a::

        mean = mean_a + d n_b / n,     M2 = M2_a + M2_b + d^2 n_a n_b / n

    No large terms cancel (unlike sum x^2 - n mean^2), so merging partial
    results read x once and stays as accurate as the two-pass formula. Empty
    sets (count 0) merge to the other set.
    """
    n = n_a + n_b
    if n == 0:
        return n, mean_a, m2_a
    d = mean_b - mean_a
    f = n_b / n
    return n, mean_a + d * f, m2_a + m2_b + d * d * n_a * f


@cuda.jit(device=True)
def warp_chan_merge(n, mean, m2):
    """``chan_merge`` over the 32 lanes of a warp, complete in lane 0 (the shuffle pattern of ``warp_sum``)."""
    offset = WARP // 2
    while offset > 0:
        n_b = cuda.shfl_down_sync(FULL_MASK, n, offset)
        mean_b = cuda.shfl_down_sync(FULL_MASK, mean, offset)
        m2_b = cuda.shfl_down_sync(FULL_MASK, m2, offset)
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
        offset //= 2
    return n, mean, m2


@cuda.jit(device=True)
def block_chan_merge(n, mean, m2, warp_slots):
    """``chan_merge`` over a 1-D block, complete in thread 0; ``warp_slots`` is a shared (3, WARP) array."""
    t = cuda.threadIdx.x
    lane = t % WARP
    n, mean, m2 = warp_chan_merge(n, mean, m2)
    if lane == 0:
        warp_slots[0, t // WARP] = n
        warp_slots[1, t // WARP] = mean
        warp_slots[2, t // WARP] = m2
    cuda.syncthreads()
    if t < WARP:
        zero = warp_slots.dtype.type(0)
        used = lane < cuda.blockDim.x // WARP
        n, mean, m2 = warp_chan_merge(
            warp_slots[0, lane] if used else zero,
            warp_slots[1, lane] if used else zero,
            warp_slots[2, lane] if used else zero,
        )
    cuda.syncthreads()
    return n, mean, m2


@cuda.jit
def channel_sums_kernel(a, b, has_b, mask, has_mask, split_len, partials):
    """Block (c, j) sums split j of channel c of the (N, C, S) arrays ``a`` (and ``a * b`` if ``has_b``).

    With ``has_mask``, a value of ``a`` counts only where ``mask`` > 0 (batch norm fused with
    ReLU: the gradient flows only where the ReLU's output is positive).

    The channel's M = N*S values are numbered m = n*S + s; split j covers
    m in [j*split_len, (j+1)*split_len). Thread t loads UNROLL values
    m = base + u*T (u < UNROLL, T threads) before adding them, then moves on by
    UNROLL*T: consecutive threads read consecutive addresses (coalesced).
    partials[0, c, j] = sum a, partials[1, c, j] = sum a*b (float64).
    """
    slots = cuda.shared.array(WARP, dtype=float64)
    c = cuda.blockIdx.x
    j = cuda.blockIdx.y
    n_img, _, n_s = a.shape
    start = j * split_len
    stop = min(start + split_len, n_img * n_s)
    step = cuda.blockDim.x
    sum_a = float64(0)
    sum_ab = float64(0)
    va = cuda.local.array(UNROLL, float64)
    vb = cuda.local.array(UNROLL, float64)
    for base in range(start + cuda.threadIdx.x, stop, step * UNROLL):
        for u in range(UNROLL):  # the loads first: UNROLL independent requests in flight
            m = base + u * step
            va[u] = 0
            vb[u] = 0
            if m < stop:
                if not has_mask or mask[m // n_s, c, m % n_s] > 0:
                    va[u] = a[m // n_s, c, m % n_s]
                if has_b:
                    vb[u] = b[m // n_s, c, m % n_s]
        for u in range(UNROLL):
            sum_a += va[u]
            sum_ab += va[u] * vb[u]
    sum_a = block_total(sum_a, slots)
    sum_ab = block_total(sum_ab, slots)
    if cuda.threadIdx.x == 0:
        partials[0, c, j] = sum_a
        partials[1, c, j] = sum_ab


@cuda.jit
def sum_splits_kernel(partials, out):
    """Block (q, c): out[q, c] = sum over j of partials[q, c, j], in a fixed order (deterministic).

    Thread t adds j = t, t + T, ... in turn, then ``block_total`` adds the
    threads' sums in its fixed tree order: the same bits on every run.
    """
    slots = cuda.shared.array(WARP, dtype=float64)
    q = cuda.blockIdx.x
    c = cuda.blockIdx.y
    acc = float64(0)
    for j in range(cuda.threadIdx.x, partials.shape[2], cuda.blockDim.x):
        acc += partials[q, c, j]
    total = block_total(acc, slots)
    if cuda.threadIdx.x == 0:
        out[q, c] = total


def channel_sums(a, b=None, mask=None):
    """(sum a, sum a*b) per channel of (N, C, S) arrays, as a (2, C) array of a's dtype (float64 sums).

    Split blocks, then the fixed-order pass over the splits.

    Row 1 is all zeros when ``b`` is None; with ``mask`` (N, C, S), a's values count only where mask > 0.
    """
    n_img, n_c, n_s = a.shape
    threads = split_threads()
    n_splits = splits(n_c, n_img * n_s, threads * UNROLL)
    partials = empty((2, n_c, n_splits), np.float64)
    channel_sums_kernel[(n_c, n_splits), threads](
        a, a if b is None else b, b is not None, a if mask is None else mask, mask is not None,
        split_range(n_img * n_s, n_splits), partials
    )
    return sum_partials(partials, a.dtype)


def sum_partials(partials, dtype):
    """out (Q, C) of ``dtype`` = partials (Q, C, splits) summed over the splits by ``sum_splits_kernel``."""
    q, c, n_splits = partials.shape
    out = empty((q, c), dtype)
    sum_splits_kernel[(q, c), WARP if SIMULATOR or n_splits <= WARP else REDUCE_BLOCK](partials, out)
    return out


# The split-reduction kernels are shared; each module that launches them lists them
# in its own PTX_SIGNATURES with these signatures.
CHANNEL_SUMS_SIGNATURES = float_signatures(
    "void({t}[:, :, ::1], {t}[:, :, ::1], boolean, {t}[:, :, ::1], boolean, int64, float64[:, :, ::1])"
)
SUM_SPLITS_SIGNATURES = float_signatures("void(float64[:, :, ::1], {t}[:, ::1])")
