"""Cache-line-aligned arrays for the CPU kernels' outputs, and the empty array that stands for an absent one.

NumPy's allocator places an array's first value on a 16-byte boundary. A 64-byte
vector load (one AVX-512 register) from an address that is not a multiple of 64
straddles two cache lines and costs two loads. conv2d's grad_weight (cpu v5) reads
gy -- the output of the batch-norm backward before it -- one 64-byte vector at a
time from the start of each row, so when gy starts on a cache line (and a row is a
whole number of vectors), every one of those loads is whole.
"""
from __future__ import annotations

import math

import numpy as np

CACHE_LINE = 64


def empty_aligned(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` whose first value sits on a cache-line boundary.

    It is a view of a slightly larger byte buffer (``.base``), like any array cut from another. An
    empty array has no first value: it is a plain ``np.empty`` (NumPy may point it anywhere).
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize  # math.prod: ~0.1 us where np.prod takes ~3 us (timeit, this machine), and this runs ~30 times a step
    if nbytes == 0:
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start : start + nbytes].view(dtype).reshape(shape)


_EMPTY = {}  # dtype -> the empty array ``given`` hands out (writeable: a read-only one is another type to Numba)


def given(a, dtype) -> np.ndarray:
    """``a``, or for None an empty array of ``dtype``: what a cpu kernel gets for an absent argument (a
    convolution's bias, a batch norm's weight or running statistics), and tests by its length.

    Numba compiles a function once per combination of argument types, and None is a type of its own:
    every None-able argument would double the compilations of the kernel (and of every fused kernel
    that calls it). The empty array has the type of a given one, so one compilation serves both.
    """
    if a is not None:
        return a
    empty = _EMPTY.get(dtype)
    if empty is None:
        empty = _EMPTY[dtype] = np.empty(0, dtype)
    return empty
