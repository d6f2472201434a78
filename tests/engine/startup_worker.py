"""One rank of a 2-rank group started by hand (rank 0's process hosts the rendezvous store), rank 1 joining later
than the collective timeout, as a node that starts late does: the rendezvous must wait for it, and the collective
timeout must still bound a collective.

Usage: RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p startup_worker.py TIMEOUT_S READY_FILE
Prints "started together" and "collective timed out" (rank 1) and exits 0.
"""
import os
import sys
import time

import deepspeed  # noqa: F401  (imported before the start-up is timed)
import torch.distributed as dist

from fewstep.engine import distributed

timeout, ready = float(sys.argv[1]), sys.argv[2]
if os.environ["RANK"] == "0":
    open(ready, "w").close()
else:  # joins 3 timeouts after rank 0 has entered the rendezvous
    while not os.path.exists(ready):
        time.sleep(0.05)
    time.sleep(3 * timeout)
info = distributed.setup_distributed(timeout_seconds=timeout)
means, _ = distributed.reduce_step({"x": float(info.rank)})
assert means == {"x": 0.5}, means
print("started together", flush=True)

if info.rank == 0:  # late for a plain collective by 3 timeouts, then gone
    time.sleep(3 * timeout)
else:
    try:
        dist.barrier()
        raise AssertionError("a barrier outlived the collective timeout")
    except RuntimeError as e:
        assert "timed out" in str(e).lower(), e  # not the store's host leaving
    print("collective timed out", flush=True)
sys.stdout.flush()
os._exit(0)  # the group is broken: no teardown (gloo's destructors could abort the exit)
