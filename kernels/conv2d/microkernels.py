"""Register-blocked micro-kernels written as explicit 512-bit vector code (LLVM IR from Numba).

Why this file exists. A convolution (as a GEMM) runs near the FMA peak only when
its innermost loop keeps a block of the output in *registers* for the whole
reduction and does many fused multiply-adds per value it loads. An AVX-512 core
has 32 vector registers of 16 floats and can start two 16-wide FMAs per cycle;
a block of 8 output channels x 48 pixels is 24 registers of accumulators, and
each step of the reduction then loads 3 vectors of inputs and 8 weights and does
24 vector FMAs (384 multiply-adds): the multipliers, not the loads, bound it.

Numba has no vector type, and LLVM's auto-vectoriser picks 256-bit registers on
AVX-512 CPUs (their "prefer-256-bit" tuning), which halves the peak -- conv2d v4
in ``cpu.py`` is the measured consequence. So the micro-kernels here are
Numba *intrinsics*: Python functions that emit the LLVM IR of the loop directly,
with vectors of 64 bytes (``<16 x float>``, ``<8 x double>``) as values. LLVM
keeps each accumulator in a register (they are SSA values carried by phi nodes:
there is no memory to spill them to unless registers run out) and lowers every
``llvm.fma`` to one ``vfmadd`` on a zmm register. On a CPU without AVX-512 the
same IR is split into 256- or 128-bit halves: slower, equally correct.

``tile_product`` and ``tile_dots`` read their operands through tables of offsets
(``tile_outer`` computes its own: its taps are a kh x kw pattern of compile-time constants). ``offs``: row k of the
(implicit) K x pixels matrix B starts at ``x[offs[k]]``; for a convolution at
stride 1, row k = (c, p, q) of B is the padded input band shifted to tap (p, q)
of channel c (see ``cpu.py``, *Taps*), so B is read in place: no im2col copy.
``xoffs`` / ``yoffs`` (``gyoffs``): where each vector of pixels of a block starts
in B's rows and in the output (or gy), so a block can span image rows.

* ``tile_product`` (forward, and grad_input as a forward): the block
  ``y[a*ldy + yoffs[v] + l] = bias[a] + sum_k w[k*ldw + a] * x[offs[k] + xoffs[v] + l]``
  for a < MR channels, v < NV vectors, l < lanes; the weights are a packed panel
  (K rows of MR or more).
* ``tile_dots`` (grad_weight): the block ``out[a*ldo + t] += sum_{v, l}
  gy[a*ldg + gyoffs[v] + l] * x[offs[t] + xoffs[v] + l]`` for a < MW channels and
  t < KT weights: MW*KT dot products over the pixels, each accumulated in a vector
  and summed across its lanes at the end (a fixed tree of adds: the result does
  not depend on anything but the data).

* ``tile_outer`` (grad_weight, v6): the block ``out[t*ldo + a*lanes + l] += sum over
  pixels of gt[pixel, a*lanes + l] * x[tap t's row + pixel]`` for a < MO vectors of
  output channels and t < the 3x3 taps of a few input channels: outer products of a
  vector of gy^T (``gt``, pixel-major) and one value of x broadcast to every lane,
  so no sum crosses lanes and x needs no alignment (a broadcast reads one value).
* ``transpose_block``: a lanes x lanes block transposed in registers (log2(lanes)
  rounds of shuffles), which is how v6 makes gy^T.
* ``copy_values``: a ``memcpy`` of a row of values, for the padded bands.

Every call names its block shape (MR, NV or MW, KT or MO, CB) as compile-time
constants, so the loops over it are unrolled into straight-line code.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

VECTOR_BYTES = 64  # one AVX-512 register


def lanes(dtype) -> int:
    """Values per vector register: 16 float32 or 8 float64."""
    return VECTOR_BYTES // dtype.itemsize


def _literal(value, name):
    if not isinstance(value, types.IntegerLiteral):
        raise TypingError(f"{name} must be a compile-time constant (an integer literal)")
    return value.literal_value


def _splat(builder, value, vt):
    """A vector of vt's width with every lane = value (LLVM folds it into the FMA's broadcast operand)."""
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), vt.count), None))


def _lane_sum(builder, vec):
    """Sum of a vector's lanes by halving: v[:n/2] + v[n/2:] until one lane is left (a fixed order)."""
    while vec.type.count > 1:
        half = vec.type.count // 2
        lo = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half))))
        hi = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half, 2 * half))))
        vec = builder.fadd(lo, hi)
    return builder.extract_element(vec, ir.Constant(ir.IntType(32), 0))


def _counted_loop(builder, count, carried, body, nonempty=False):
    """Emit ``for k in range(count): carried = body(k, carried)`` and return the final ``carried``.

    ``carried`` is a list of LLVM values (the accumulators): each becomes a phi node, which
    is how a value lives in a register across iterations in SSA form. ``nonempty``: the
    caller guarantees count >= 1, so there is no path around the loop, and the values before
    it are dead once it starts. (Otherwise they stay live through the loop, for the count = 0
    path: with loops nested, that doubles the registers the accumulators need, and LLVM
    spills them.)
    """
    i64 = ir.IntType(64)
    entry = builder.basic_block
    loop = builder.append_basic_block("micro.loop")
    done = builder.append_basic_block("micro.done")
    if nonempty:
        builder.branch(loop)
    else:
        builder.cbranch(builder.icmp_signed(">", count, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    phis = [builder.phi(v.type) for v in carried]
    new = body(k, phis)
    k_next = builder.add(k, ir.Constant(i64, 1))
    end = builder.basic_block
    builder.cbranch(builder.icmp_signed("<", k_next, count), loop, done)
    k.add_incoming(ir.Constant(i64, 0), entry)
    k.add_incoming(k_next, end)
    for phi, start, value in zip(phis, carried, new):
        phi.add_incoming(start, entry)
        phi.add_incoming(value, end)
    builder.position_at_end(done)
    if nonempty:
        return new
    out = []
    for start, value in zip(carried, new):
        merged = builder.phi(start.type)
        merged.add_incoming(start, entry)
        merged.add_incoming(value, end)
        out.append(merged)
    return out


def _fma(builder, vt):
    """The ``llvm.fma`` intrinsic on vectors of type vt: one rounding per multiply-add (a vfmadd instruction)."""
    name = f"llvm.fma.v{vt.count}f{vt.element.intrinsic_name[1:]}"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), name)


def _pointers(context, builder, dtype, *addresses):
    ft = context.get_value_type(dtype)
    return ft, [builder.inttoptr(a, ft.as_pointer()) for a in addresses]


def _vector_at(builder, base, index, vt, align):
    """The vector of vt.count values at base[index] (unaligned load)."""
    return builder.load(builder.bitcast(builder.gep(base, [index]), vt.as_pointer()), align=align)


def _table(builder, address, count):
    """The first ``count`` (a constant) int64 values at ``address``."""
    i64 = ir.IntType(64)
    table = builder.inttoptr(address, i64.as_pointer())
    return [builder.load(builder.gep(table, [ir.Constant(i64, v)])) for v in range(count)]


@intrinsic
def tile_product(typingctx, like, x, xoffs, offs, w, ldw, k_count, y, yoffs, ldy, bias, mr, nv):
    """y[a*ldy + yoffs[v] + l] = bias[a] + sum_{k < k_count} w[k*ldw + a] * x[offs[k] + xoffs[v] + l]

    for a < mr channels, v < nv vectors and l < lanes: an mr x nv block of output vectors. The
    vectors of the block can lie anywhere (``xoffs``, ``yoffs``: where vector v of the block starts
    in x's rows and in y), so a block can span rows of an image. x, w, y, bias are addresses of
    ``like``'s dtype, xoffs, offs, yoffs of int64 tables; mr and nv are constants. y is
    overwritten (k_count = 0 writes the bias).
    """
    mr_, nv_ = _literal(mr, "mr"), _literal(nv, "nv")
    sig = types.none(like, x, xoffs, offs, w, ldw, k_count, y, yoffs, ldy, bias, mr, nv)
    dtype = like.dtype

    def codegen(context, builder, signature, args):
        _, x_addr, xoffs_addr, offs_addr, w_addr, ldw_v, kk, y_addr, yoffs_addr, ldy_v, b_addr = args[:11]
        ft, (xp, wp, yp, bp) = _pointers(context, builder, dtype, x_addr, w_addr, y_addr, b_addr)
        i64 = ir.IntType(64)
        offp = builder.inttoptr(offs_addr, i64.as_pointer())
        vt = ir.VectorType(ft, VECTOR_BYTES * 8 // dtype.bitwidth)
        fma = _fma(builder, vt)
        align = dtype.bitwidth // 8
        xo, yo = _table(builder, xoffs_addr, nv_), _table(builder, yoffs_addr, nv_)
        start = []
        for a in range(mr_):
            b = _splat(builder, builder.load(builder.gep(bp, [ir.Constant(i64, a)])), vt)
            start.extend([b] * nv_)

        def step(k, acc):
            row = builder.load(builder.gep(offp, [k]))
            xs = [_vector_at(builder, xp, builder.add(row, xo[v]), vt, align) for v in range(nv_)]
            wrow = builder.mul(k, ldw_v)
            out = []
            for a in range(mr_):
                wa = _splat(builder, builder.load(builder.gep(wp, [builder.add(wrow, ir.Constant(i64, a))])), vt)
                out.extend(builder.call(fma, [wa, xs[v], acc[a * nv_ + v]]) for v in range(nv_))
            return out

        acc = _counted_loop(builder, kk, start, step)
        for a in range(mr_):
            ya = builder.mul(ir.Constant(i64, a), ldy_v)
            for v in range(nv_):
                at = builder.gep(yp, [builder.add(ya, yo[v])])
                builder.store(acc[a * nv_ + v], builder.bitcast(at, vt.as_pointer()), align=align)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_dots(typingctx, like, gy, gyoffs, ldg, x, xoffs, offs, n_vectors, out, ldo, mw, kt):
    """out[a*ldo + t] += sum_{v < n_vectors} sum_l gy[a*ldg + gyoffs[v] + l] * x[offs[t] + xoffs[v] + l]

    for a < mw channels and t < kt weights: mw*kt dot products over n_vectors vectors of pixels,
    which can lie anywhere (vector v at ``gyoffs[v]`` in each gy row, at ``xoffs[v]`` past each x
    row's start). gy, x, out are addresses of ``like``'s dtype, gyoffs, xoffs, offs of int64
    tables (offs: kt entries); mw and kt are constants. Each sum runs in its own vector of
    partial sums, added across lanes by ``_lane_sum`` at the end.
    """
    mw_, kt_ = _literal(mw, "mw"), _literal(kt, "kt")
    sig = types.none(like, gy, gyoffs, ldg, x, xoffs, offs, n_vectors, out, ldo, mw, kt)
    dtype = like.dtype

    def codegen(context, builder, signature, args):
        _, gy_addr, gyoffs_addr, ldg_v, x_addr, xoffs_addr, offs_addr, nvec, out_addr, ldo_v = args[:10]
        ft, (gp, xp, op) = _pointers(context, builder, dtype, gy_addr, x_addr, out_addr)
        i64 = ir.IntType(64)
        gyo = builder.inttoptr(gyoffs_addr, i64.as_pointer())
        xo = builder.inttoptr(xoffs_addr, i64.as_pointer())
        vt = ir.VectorType(ft, VECTOR_BYTES * 8 // dtype.bitwidth)
        fma = _fma(builder, vt)
        align = dtype.bitwidth // 8
        rows = _table(builder, offs_addr, kt_)
        gy_rows = [builder.mul(ir.Constant(i64, a), ldg_v) for a in range(mw_)]

        def step(v, acc):
            m, mg = builder.load(builder.gep(xo, [v])), builder.load(builder.gep(gyo, [v]))
            xs = [_vector_at(builder, xp, builder.add(rows[t], m), vt, align) for t in range(kt_)]
            out = []
            for a in range(mw_):
                g = _vector_at(builder, gp, builder.add(gy_rows[a], mg), vt, align)
                out.extend(builder.call(fma, [g, xs[t], acc[a * kt_ + t]]) for t in range(kt_))
            return out

        acc = _counted_loop(builder, nvec, [ir.Constant(vt, None)] * (mw_ * kt_), step)
        for a in range(mw_):
            for t in range(kt_):
                ptr = builder.gep(op, [builder.add(builder.mul(ir.Constant(i64, a), ldo_v), ir.Constant(i64, t))])
                builder.store(builder.fadd(builder.load(ptr), _lane_sum(builder, acc[a * kt_ + t])), ptr)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_outer(typingctx, like, gt, ldg_row, ldg_pix, x, cs, wq, n_rows, n_cols, out, ldo, mo, cb, kh, kw):
    """out[((c*kh + p)*kw + q)*ldo + a*lanes + l] += sum_{r < n_rows, j < n_cols}
    gt[r*ldg_row + j*ldg_pix + a*lanes + l] * x[c*cs + (r + p)*wq + j + q]

    for c < cb channels, taps p < kh, q < kw, a < mo vectors of output channels and l < lanes: the
    sum over a block of pixels of outer products, a column of mo*lanes channels of gy^T (``gt``,
    pixel-major: one pixel's channels are consecutive) times a row of cb*kh*kw taps of the padded
    input band ``x`` (rows of ``wq`` values, channels ``cs`` apart). Each tap's value is one
    number, broadcast to all lanes (the FMA takes it straight from memory), so no sum ever crosses
    lanes: the mo*cb*kh*kw accumulators start at zero, run over the block and are added to
    ``out`` at the end. gt, x, out are addresses of ``like``'s dtype; mo, cb, kh, kw are constants.
    """
    mo_, cb_, kh_, kw_ = (_literal(v, n) for v, n in ((mo, "mo"), (cb, "cb"), (kh, "kh"), (kw, "kw")))
    sig = types.none(like, gt, ldg_row, ldg_pix, x, cs, wq, n_rows, n_cols, out, ldo, mo, cb, kh, kw)
    dtype = like.dtype

    def codegen(context, builder, signature, args):
        _, g_addr, ldg_row_v, ldg_pix_v, x_addr, cs_v, wq_v, nrows, ncols, out_addr, ldo_v = args[:11]
        ft, (gp, xp, op) = _pointers(context, builder, dtype, g_addr, x_addr, out_addr)
        i64 = ir.IntType(64)
        vt = ir.VectorType(ft, VECTOR_BYTES * 8 // dtype.bitwidth)
        lanes_ = vt.count
        fma = _fma(builder, vt)
        align = dtype.bitwidth // 8
        taps = [(c, p, q) for c in range(cb_) for p in range(kh_) for q in range(kw_)]

        def row(r, acc):
            g_row = builder.mul(r, ldg_row_v)
            # where each (channel, tap row) of this output row starts in x: cb*kh bases per row
            bases = {(c, p): builder.add(builder.mul(ir.Constant(i64, c), cs_v), builder.mul(builder.add(r, ir.Constant(i64, p)), wq_v))
                     for c in range(cb_) for p in range(kh_)}

            def pixel(j, acc):
                g_at = builder.add(g_row, builder.mul(j, ldg_pix_v))
                gs = [_vector_at(builder, gp, builder.add(g_at, ir.Constant(i64, a * lanes_)), vt, align) for a in range(mo_)]
                out = list(acc)
                for t, (c, p, q) in enumerate(taps):
                    value = builder.load(builder.gep(xp, [builder.add(builder.add(bases[c, p], j), ir.Constant(i64, q))]))
                    s = _splat(builder, value, vt)
                    for a in range(mo_):
                        out[t * mo_ + a] = builder.call(fma, [gs[a], s, acc[t * mo_ + a]])
                return out

            return _counted_loop(builder, ncols, acc, pixel, nonempty=True)

        acc = _counted_loop(builder, nrows, [ir.Constant(vt, None)] * (len(taps) * mo_), row, nonempty=True)
        for t in range(len(taps)):
            for a in range(mo_):
                at = builder.bitcast(builder.gep(op, [builder.add(builder.mul(ir.Constant(i64, t), ldo_v), ir.Constant(i64, a * lanes_))]),
                                     vt.as_pointer())
                builder.store(builder.fadd(builder.load(at, align=align), acc[t * mo_ + a]), at, align=align)
        return context.get_dummy_value()

    return sig, codegen


def _swap_bit_masks(lanes_, k):
    """The two shuffle masks that swap bit k of the row index with bit k of the lane index for a pair
    of rows A (bit k clear) and A + 2**k: indices < lanes pick from row A, the rest from row A + 2**k."""
    b = 1 << k
    low = [lane if not lane & b else lanes_ + lane - b for lane in range(lanes_)]
    high = [lane + b if not lane & b else lanes_ + lane for lane in range(lanes_)]
    return low, high


@intrinsic
def transpose_block(typingctx, like, src, lds, dst, ldd):
    """dst[l*ldd + a] = src[a*lds + l] for a, l < lanes: one lanes x lanes block transposed in registers.

    Element (row a, lane l) must end at (row l, lane a): swap the bits of the two indices, one bit
    per stage. Stage k pairs rows A and A + 2**k and exchanges, between them, the lanes whose bit k
    differs from the row's (two shuffles per pair); log2(lanes) stages of lanes shuffles each, so
    16 x 16 floats take 64 shuffles and no memory but the loads and stores. src and dst are
    addresses of ``like``'s dtype, lds and ldd in values.
    """
    sig = types.none(like, src, lds, dst, ldd)
    dtype = like.dtype

    def codegen(context, builder, signature, args):
        _, s_addr, lds_v, d_addr, ldd_v = args
        ft, (sp, dp) = _pointers(context, builder, dtype, s_addr, d_addr)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        vt = ir.VectorType(ft, VECTOR_BYTES * 8 // dtype.bitwidth)
        lanes_ = vt.count
        align = dtype.bitwidth // 8
        rows = [_vector_at(builder, sp, builder.mul(ir.Constant(i64, a), lds_v), vt, align) for a in range(lanes_)]
        k = 0
        while 1 << k < lanes_:
            low, high = (ir.Constant(ir.VectorType(i32, lanes_), m) for m in _swap_bit_masks(lanes_, k))
            for a in range(lanes_):
                if not a & (1 << k):
                    b = a + (1 << k)
                    rows[a], rows[b] = builder.shuffle_vector(rows[a], rows[b], low), builder.shuffle_vector(rows[a], rows[b], high)
            k += 1
        for lane in range(lanes_):
            at = builder.gep(dp, [builder.mul(ir.Constant(i64, lane), ldd_v)])
            builder.store(rows[lane], builder.bitcast(at, vt.as_pointer()), align=align)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_values(typingctx, like, dst, src, n):
    """dst[:n] = src[:n] for addresses of ``like``'s dtype (``llvm.memcpy``: the regions must not overlap).

    A band row is tens of values: copied by a Numba loop it runs a value at a time (the compiler
    cannot rule out that the two arrays overlap, so it does not vectorise), and a slice
    assignment spends more on making its views than on the copy.
    """
    sig = types.none(like, dst, src, n)
    dtype = like.dtype

    def codegen(context, builder, signature, args):
        _, d_addr, s_addr, count = args
        _, (dp, sp) = _pointers(context, builder, dtype, d_addr, s_addr)
        cgutils.raw_memcpy(builder, dp, sp, count, context.get_abi_sizeof(context.get_value_type(dtype)))
        return context.get_dummy_value()

    return sig, codegen
