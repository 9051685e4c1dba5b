"""accumulate: reference.py (the math), cpu.py (Numba), cuda.py (Numba CUDA): total += part, in place."""
