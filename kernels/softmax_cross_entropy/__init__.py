"""softmax_cross_entropy: reference.py (the math), cpu.py (Numba), cuda.py (Numba CUDA)."""
