"""sgd: reference.py (the math), cpu.py (Numba), cuda.py (Numba CUDA): the SGD update, in place."""
