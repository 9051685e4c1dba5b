"""Every op of minseg three ways: reference (NumPy), cpu (Numba), cuda (Numba CUDA). See README.md."""
from kernels import numba_cache

# Numba checks a cached kernel against its own file only, not the files compiled into it:
# clear the cache when any kernel source changed (numba_cache.py says why and how).
numba_cache.clear_if_changed()
