"""accumulate on the CPU: one compiled pass, in place, on every core for large arrays.

Read ``reference.py`` first for the math. NumPy's ``total += part`` runs on the calling
thread only; here the elements are cut into blocks of ``BLOCK`` that ``prange`` shares
between the threads. Both arrays are C-contiguous, so the loop runs over flat views
(``reshape(-1)`` of a C-contiguous array is a view: the writes land in ``total``).
No ``fastmath`` is needed or wanted: an addition is one rounding either way, so the
result equals the reference's bit for bit.

Two entry points share the loop, as in ``kernels/sgd/cpu.py`` (whose docstring gives
the basis of the estimate behind the threshold):

* ``_accumulate_parallel`` for arrays of at least ``PARALLEL_MIN`` elements (the U-Net
  skip gradients);
* ``_accumulate_serial`` below it, where waking the thread pool would cost about as
  much as the pass itself (an estimate, the same as sgd's).
"""
from __future__ import annotations

from numba import njit, prange

__all__ = ["accumulate"]

# Elements per parallel block: 64 KiB of float32 per array, so a block's scheduling cost
# is small next to its pass over memory, and a 2 MB gradient gives the threads 32 blocks.
BLOCK = 1 << 14
# Arrays smaller than this are summed serially (see the module docstring).
PARALLEL_MIN = 1 << 15


@njit(cache=True, inline="always")
def _add_range(total, part, start, stop):
    """total[e] += part[e] for e in [start, stop)."""
    for e in range(start, stop):
        total[e] += part[e]


@njit(cache=True)
def _accumulate_serial(total, part):
    """Every element on the calling thread (small arrays)."""
    _add_range(total, part, 0, total.size)


@njit(parallel=True, cache=True)
def _accumulate_parallel(total, part):
    """Blocks of BLOCK elements shared between the threads (large arrays)."""
    n = total.size
    for k in prange((n + BLOCK - 1) // BLOCK):
        _add_range(total, part, k * BLOCK, min((k + 1) * BLOCK, n))


def accumulate(total, part):
    """``total += part`` in place, one pass; returns None.

    Both C-contiguous, of the same shape and dtype; ``total`` is written, ``part`` only read.
    """
    t = total.reshape(-1)
    p = part.reshape(-1)
    kernel = _accumulate_parallel if t.size >= PARALLEL_MIN else _accumulate_serial
    kernel(t, p)
