"""Every op of minseg three ways: reference (NumPy), cpu (Numba), cuda (Numba CUDA). See README.md."""
import numpy as np

from kernels import numba_cache

# Numba checks a cached kernel against its own file only, not the files compiled into it:
# clear the cache when any kernel source changed (numba_cache.py says why and how).
numba_cache.clear_if_changed()


def restore_numpy_row_stack() -> bool:
    """Put back ``np.row_stack`` where NumPy removed it, so numba-cuda can compile.

    numba-cuda 0.30.4's array module (``numba/cuda/np/arrayobj.py``) runs
    ``overload(np.row_stack)`` when its typing context first loads, i.e. at the first
    kernel compiled for a GPU. NumPy deprecated the alias in 2.0 and removed it in 2.5,
    so with NumPy >= 2.5 every CUDA compile fails with ``AttributeError: module
    'numpy' has no attribute 'row_stack'`` (seen on an H100 machine with NumPy 2.5.2;
    Numba 0.68's CPU side already guards the name). ``row_stack`` was always another
    name for ``np.vstack``, so that is what goes back, and only where it is missing.
    It has to happen on import: the kernels' cuda modules are imported and compiled
    directly (tests, benchmarks, ``ptx_report``), not only through ``backend.load``.
    Returns True when the alias was added.
    """
    if "row_stack" in np.__dict__:
        return False
    np.row_stack = np.vstack
    return True


restore_numpy_row_stack()
