"""Worker: rank 1 raises while rank 0 waits in a barrier that rank 1 never reaches.

Without an abort the job would hang until killed; run as a plain ``python`` script,
the excepthook of ``minseg.distributed.init`` must end both ranks.
"""
import time

from minseg import distributed

world = distributed.init()
if world.rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
world.barrier()
time.sleep(120)  # only reached if the barrier returned, which it must not
