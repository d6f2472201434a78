"""A good run's last wait and teardown, as under srun or the deepspeed launcher: rank 0's process hosts the
rendezvous store (env:// rendezvous, no torchrun agent) and the group behaves as NCCL's (no gloo exit barrier).

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python teardown_worker.py
Rank 0 reaches the final wait last; rank 1 is then between two polls (1.5 s apart) of that wait.
"""
import time

import torch.distributed as dist

from fewstep.engine import distributed

dist.init_process_group("gloo", init_method="env://")
rank = dist.get_rank()
if rank == 1:
    real_sleep = time.sleep
    time.sleep = lambda s: real_sleep(1.5)  # this process sleeps only in wait_for_all's polling
else:
    time.sleep(1.0)
distributed.wait_for_all("end")
dist.get_backend = lambda *a, **k: "nccl"  # teardown's NCCL path: no exit barrier
distributed.teardown()
print(f"rank {rank} finished", flush=True)
