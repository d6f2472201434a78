"""One rank of a 2-rank group started by hand (no launcher agent that would stop the survivor): rank VICTIM is
SIGKILLed inside `uneven_work`, as the out-of-memory killer would; the survivor must stop with RankFailed instead of
waiting for ever.

Usage: RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=... MASTER_PORT=... liveness_worker.py TIMEOUT_S VICTIM
Prints "RankFailed after <s> s: <message>" and exits 0 on the survivor.
"""
import os
import signal
import sys
import time

from fewstep.engine import distributed

timeout, victim = float(sys.argv[1]), int(sys.argv[2])
info = distributed.setup_distributed(timeout_seconds=timeout)
distributed.wait_for_all("start")  # both ranks are up (and beating) before one dies
t0 = time.monotonic()
try:
    with distributed.uneven_work("cache fill"):
        if info.rank == victim:  # dies once the survivor has left the start wait and counted itself in here
            while distributed._store().add("fewstep/wait/2", 0) < 1:
                time.sleep(0.05)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
    print("passed a wait that the killed rank never reached", flush=True)
    os._exit(3)
except distributed.RankFailed as e:
    print(f"RankFailed after {time.monotonic() - t0:.1f} s: {e}", flush=True)
    os._exit(0)
