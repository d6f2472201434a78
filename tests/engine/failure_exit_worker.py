"""Leaving after a failure, as launcher/train.py does, when rank 0's process hosts the rendezvous store (srun, the
deepspeed launcher): rank 0 fails at once; rank 1 meets the failure 3 s later and still reads it from the store.

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python failure_exit_worker.py
"""
import os
import sys
import time

import torch.distributed as dist

from fewstep.engine import distributed
from fewstep.errors import UserError

dist.init_process_group("gloo", init_method="env://")
rank, start = dist.get_rank(), time.monotonic()
if rank == 0:
    distributed.announce_failure(UserError("a mistake on rank 0"))
else:
    time.sleep(3.0)  # a rank that meets the failure later than rank 0 (a slower node, a longer step)
    print(f"rank 1 read: {distributed.first_failure()}", flush=True)
distributed.leave_after_failure()
print(f"rank {rank} left after {time.monotonic() - start:.1f} s", flush=True)
sys.stdout.flush()
os._exit(2)
