"""conv2d_batch_norm: a convolution and the training-mode batch norm after it, as one call (reference.py, cpu.py, cuda.py)."""
