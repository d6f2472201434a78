"""Fault injection for the failure-mode tests, driven by environment variables (all unset in normal runs).

- FEWSTEP_FAULT_AFTER_STEP=N   hard crash (exit 17) right after optimizer step N
- FEWSTEP_FAULT_IN_SAVE=N      hard crash while checkpoint N is being written (after the shards, before the rename)
- FEWSTEP_FAULT_SIGNAL_AT_STEP=N   the process sends itself SIGUSR1 right after optimizer step N (a preemption)
- FEWSTEP_TEST_DELAY=where:seconds[,where:seconds...]   rank 0 sleeps at `where` (cache, load, validation, export,
  checkpoint): slow work on one rank, as a large cache fill or export is on real hardware
"""
from __future__ import annotations

import os
import signal
import time


def crash_if(variable: str, step: int) -> None:
    if os.environ.get(variable) == str(step):
        os._exit(17)


def signal_if(variable: str, step: int) -> None:
    if os.environ.get(variable) == str(step):
        os.kill(os.getpid(), signal.SIGUSR1)


def delay(where: str) -> None:
    spec = os.environ.get("FEWSTEP_TEST_DELAY")
    if not spec or os.environ.get("RANK", "0") != "0":
        return
    for item in spec.split(","):
        name, _, seconds = item.partition(":")
        if name.strip() == where:
            print(f"fewstep: [test] rank 0 delayed {seconds} s at {where}", flush=True)
            time.sleep(float(seconds))
