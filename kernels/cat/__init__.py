"""cat: reference.py (the math), cpu.py (Numba), cuda.py (Numba CUDA); columns.py, the 2-D view they share."""
