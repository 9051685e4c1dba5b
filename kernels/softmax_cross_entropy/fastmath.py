"""A vectorisable exp and log for Numba CPU kernels, from the bits of the floats.

Numba's ``math.exp`` and ``math.log`` compile to scalar libm calls (a few ns
each, and a call inside a loop stops LLVM from vectorising it). The two
functions here are plain arithmetic on arrays -- integer shifts and masks on
the float's bits, a short polynomial -- so the loops that call them vectorise.
They are written as Numba ``overload``s, so they exist only in compiled code:
call them from an ``@njit`` function.

* ``fast_exp(z)``: exp(z) of one float32 or float64, for results in the normal
  range (below it: 0 or the smallest normal; NaN stays NaN); arguments up to ~88
  (float32) / ~709 (float64). The result has z's dtype.
* ``fast_log(a)``: log(a) for one positive normal float32 or float64.
* ``exp_shifted(x, shift, out)``: out[i] = fast_exp(x[i] - shift[i]) over arrays.
* ``log_inplace(a)``: a[i] = fast_log(a[i]) over an array.

The scalar forms are what lets a kernel keep a whole pixel in registers (the
cross-entropy's per-class loops, ``cpu.py``): a loop that calls them still
vectorises, because they inline to plain arithmetic. The float's bits are read
and written by two one-instruction intrinsics (``_bits_of``, ``_float_of``:
an LLVM bitcast), which vectorise like any other arithmetic.

Their accuracy against NumPy, over the whole valid range, is measured by
``tests/kernels/test_fastmath.py`` (the tolerance there is the measured
maximum error, in units in the last place).
"""
from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["fast_exp", "fast_log", "exp_shifted", "log_inplace", "JIT_OPTIONS"]

_LN2 = math.log(2.0)
_LN2_DIGITS = Decimal("0.6931471805599453094172321214581765680755")
# error_model "numpy" drops Python's zero-division check, a branch that stops
# vectorisation; fastmath's "reassoc" lets LLVM vectorise sums (acc += ...) and
# "contract" fuse a*b+c into FMAs, without fastmath's no-NaN/no-inf assumptions
# (NaN inputs still give NaN).
JIT_OPTIONS = {"error_model": "numpy", "fastmath": {"reassoc", "contract"}}
# exp has no sum to vectorise, and "reassoc" would let LLVM fold the two-constant
# (z - k ln2_hi) - k ln2_lo back into z - k ln2, losing the exactness it buys.
_EXP_OPTIONS = {"error_model": "numpy", "fastmath": {"contract"}}


_BITS = {types.float32: types.int32, types.float64: types.int64}


@intrinsic
def _bits_of(typingctx, value):
    """The integer with the same bits as the float ``value`` (int32 for float32, int64 for float64)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(signature.return_type))

    return _BITS[value](value), codegen


@intrinsic
def _float_of(typingctx, bits):
    """The float whose bits are the integer ``bits`` (float32 for int32, float64 for int64)."""
    ftype = {itype: ftype for ftype, itype in _BITS.items()}[bits]

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(signature.return_type))

    return ftype(bits), codegen


def _constants(ftype):
    """(int type, mantissa bits, exponent bias, NumPy float type) of a Numba float type."""
    if ftype == types.float32:
        return np.int32, 23, 127, np.float32
    return np.int64, 52, 1023, np.float64


def fast_exp(z):
    """exp(z) of one float (compiled only; see the overload below)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(fast_exp, jit_options=_EXP_OPTIONS, inline="always")
def fast_exp_impl(z):
    """exp(z) = 2^k e^r, k = round(z / ln2), r = z - k ln2 in [-ln2/2, ln2/2].

    r is computed as (z - k ln2_hi) - k ln2_lo (Cody and Waite): ln2_hi holds
    ln2's leading bits with enough trailing zeros that k ln2_hi is exact, so
    the subtraction loses nothing; a one-constant k ln2 would carry ln2's
    rounding error times k (about 200 ulp at z = 700 in float64).

    e^r: Horner on the Taylor series, truncation r^(d+1)/(d+1)! below an ulp.
    (k is an integer, so r and e^r are computed in float64 even for a float32 z:
    the measured accuracy in ``tests/kernels/test_fastmath.py`` is of that.)
    2^k: the float whose exponent field is k + bias and mantissa 0, built as an
    integer and bitcast. z is clamped below at -bias ln2, where k = -bias
    makes the exponent field 0 and the result exactly 0 (results that would be
    subnormal come out as 0 or the smallest normal). Valid up to the largest
    exponent (z < ~88 in float32, ~709 in float64).
    """
    itype, nmant, bias, ftype = _constants(z)
    degree = 7 if ftype is np.float32 else 12
    coefs = tuple(ftype(1.0 / math.factorial(j)) for j in range(degree, -1, -1))
    lo, log2e, half = ftype(-bias * _LN2), ftype(1.0 / _LN2), ftype(0.5)
    hi_bits = 20 if ftype is np.float32 else 42  # k < 2^11 times a 42-bit (20-bit) constant: exact
    ln2_hi = math.ldexp(math.floor(math.ldexp(_LN2, hi_bits)), -hi_bits)
    ln2_lo = ftype(float(_LN2_DIGITS - Decimal(ln2_hi)))  # from the digits: float ln2 itself is rounded
    ln2_hi = ftype(ln2_hi)
    ibias, shift_bits = itype(bias), itype(nmant)

    def impl(z):
        z = max(z, lo)
        # k = floor(z / ln2 + 1/2), as truncation and a correction: math.floor on a float32 is a
        # call to libm's floorf, which would keep every loop calling fast_exp scalar
        t = z * log2e + half
        k = itype(t)
        k -= itype(k > t)
        r = (z - k * ln2_hi) - k * ln2_lo
        p = coefs[0]
        for c in coefs[1:]:
            p = p * r + c
        return ftype(_float_of(itype((k + ibias) << shift_bits)) * p)  # itype(): Numba widens int32 sums to int64

    return impl


def fast_log(a):
    """log(a) of one positive normal float (compiled only; see the overload below)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(fast_log, jit_options=JIT_OPTIONS, inline="always")
def fast_log_impl(a):
    """log(a) = e ln2 + log(f), a = 2^e f with f in [sqrt(1/2), sqrt(2)).

    e and f are read from the bits (exponent field, and the mantissa with the
    exponent field set to 0). log(f) = 2 atanh(u) = 2 (u + u^3/3 + u^5/5 + ...)
    with u = (f - 1)/(f + 1), |u| <= 0.172: 5 terms in float32, 11 in float64
    reach the last bit.
    """
    itype, nmant, bias, ftype = _constants(a)
    terms = 5 if ftype is np.float32 else 11
    coefs = tuple(ftype(2.0 / (2 * j + 1)) for j in range(terms - 1, -1, -1))
    mant_mask, one_bits = itype((1 << nmant) - 1), itype(bias << nmant)
    ibias, shift_bits = itype(bias), itype(nmant)
    sqrt2, ln2, one, half = ftype(math.sqrt(2.0)), ftype(_LN2), ftype(1.0), ftype(0.5)

    def impl(a):
        bits = _bits_of(a)
        e = ftype((bits >> shift_bits) - ibias)
        f = _float_of(itype((bits & mant_mask) | one_bits))  # the mantissa, in [1, 2)
        if f > sqrt2:  # fold into [sqrt(1/2), sqrt(2))
            f *= half
            e += one
        u = (f - one) / (f + one)
        u2 = u * u
        p = coefs[0]
        for c in coefs[1:]:
            p = p * u2 + c
        return e * ln2 + u * p

    return impl


def exp_shifted(x, shift, out):
    """out[i] = exp(x[i] - shift[i]) (compiled only; see the overload below)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(exp_shifted, jit_options=_EXP_OPTIONS)
def exp_shifted_impl(x, shift, out):
    """out[i] = fast_exp(x[i] - shift[i]): one loop LLVM vectorises."""

    def impl(x, shift, out):
        for i in range(out.size):
            out[i] = fast_exp(x[i] - shift[i])

    return impl


def log_inplace(a):
    """a[i] = log(a[i]) for positive normal a (compiled only; see the overload below)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(log_inplace, jit_options=JIT_OPTIONS)
def log_inplace_impl(a):
    """a[i] = fast_log(a[i]): one loop LLVM vectorises."""

    def impl(a):
        for i in range(a.size):
            a[i] = fast_log(a[i])

    return impl
