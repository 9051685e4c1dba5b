"""Worker: rank 1 raises while rank 0 waits in a barrier that rank 1 never reaches.

Without an abort the job would hang until killed; run as a plain ``python`` script,
the excepthook of ``minseg.distributed.init`` must end both ranks.
"""
import os
import time

from minseg import distributed

MESSAGE = "rank 1 fails on purpose"

world = distributed.init()
if world.rank == 1:
    # the test reads this file: the job's stderr can lose the traceback (below)
    with open(os.environ["MINSEG_TEST_FAILURE_FILE"], "w") as f:
        f.write(MESSAGE)
    raise RuntimeError(MESSAGE)
world.barrier()
time.sleep(120)  # only reached if the barrier returned, which it must not
