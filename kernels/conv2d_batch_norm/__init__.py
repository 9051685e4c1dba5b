"""conv2d_batch_norm: a convolution and the training-mode batch norm after it, and runs of such layers (a double
conv), as one call each way (reference.py, cpu.py, cuda.py)."""
