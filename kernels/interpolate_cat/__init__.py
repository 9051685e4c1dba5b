"""interpolate_cat: a resize and the channel concatenation after it (a U-Net decoder's input), as one call each way (reference.py, cpu.py, cuda.py)."""
