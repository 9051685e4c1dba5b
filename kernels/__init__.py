"""Every op of minseg three ways: reference (NumPy), cpu (Numba), cuda (Numba CUDA). See README.md."""
