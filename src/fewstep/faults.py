"""Fault injection for the failure-mode tests, driven by environment variables (all unset in normal runs).

- FEWSTEP_FAULT_AFTER_STEP=N   hard crash (exit 17) right after optimizer step N
- FEWSTEP_FAULT_IN_SAVE=N      hard crash while checkpoint N is being written (after the shards, before the rename)
- FEWSTEP_FAULT_SIGNAL_AT_STEP=N[:SIGNAME[:COUNT]]   the process sends itself SIGUSR1 (or SIGNAME, COUNT times) right
  after optimizer step N's micro-batches (a preemption; SIGINT: a Ctrl-C)
- FEWSTEP_FAULT_NAN_LOSS=N:R[:COUNT]   rank R's loss is NaN in the first COUNT (default 1) attempts at step N
- FEWSTEP_FAULT_POISON_WEIGHTS=N:R   right after optimizer step N, rank R's trained weights hold a NaN (a corruption
  the step-level guard cannot see: what the finite-weights check before every checkpoint and export stops)
- FEWSTEP_TEST_DELAY=where:seconds[,where:seconds...]   rank 0 sleeps at `where` (scan, probe, encode, cache, load,
  logger, validation, export, deepspeed-save, checkpoint): slow work on one rank, as a large cache fill or export is
  on real hardware
- FEWSTEP_TEST_RNG_DRAW=where[,where...]   a rank reaching `where` draws from the global generators (torch's CPU and
  CUDA ones, random, NumPy), as library code run there may (initialisers while loading, a sampler in a validation)
"""
from __future__ import annotations

import os
import signal
import time


def crash_if(variable: str, step: int) -> None:
    if os.environ.get(variable) == str(step):
        os._exit(17)


def signal_if(variable: str, step: int) -> None:
    """`variable` = "N" sends SIGUSR1 at step N; "N:SIGINT:2" sends that signal twice (a double Ctrl-C)."""
    spec = os.environ.get(variable, "").split(":")
    at, name, count = spec[0], spec[1] if len(spec) > 1 else "SIGUSR1", int(spec[2]) if len(spec) > 2 else 1
    if at == str(step):
        for _ in range(count):
            os.kill(os.getpid(), getattr(signal, name))


_nan_attempts = {"n": 0}


def nan_loss_if(loss, step: int, rank: int):
    """`loss` times NaN when FEWSTEP_FAULT_NAN_LOSS names this step and rank (and attempts are left)."""
    spec = os.environ.get("FEWSTEP_FAULT_NAN_LOSS")
    if not spec:
        return loss
    at, who, *count = (int(x) for x in spec.split(":"))
    if (at, who) != (step, rank) or _nan_attempts["n"] >= (count[0] if count else 1):
        return loss
    _nan_attempts["n"] += 1
    return loss * float("nan")


def poison_weights_if(params, step: int, rank: int) -> None:
    """One NaN in the first of `params` this rank holds an element of (its ZeRO-3 shard, or the whole tensor) when
    FEWSTEP_FAULT_POISON_WEIGHTS names this step and rank."""
    spec = os.environ.get("FEWSTEP_FAULT_POISON_WEIGHTS")
    if not spec or tuple(int(x) for x in spec.split(":")) != (step, rank):
        return
    from fewstep.engine.nonfinite import owned_values

    for p in params:
        values = owned_values(p, rank)  # what the finite-weights check reads (a ZeRO-3 shard may be all padding)
        if values.numel():
            values[0] = float("nan")
            return


def work_at(where: str) -> None:
    """A stand-in for the non-training work done at `where` (FEWSTEP_TEST_DELAY, FEWSTEP_TEST_RNG_DRAW)."""
    if where in os.environ.get("FEWSTEP_TEST_RNG_DRAW", "").split(","):
        import random

        import numpy as np
        import torch
        torch.rand(7)
        if torch.cuda.is_available():
            torch.rand(7, device="cuda")
        random.random()
        np.random.rand(3)
    spec = os.environ.get("FEWSTEP_TEST_DELAY")
    if not spec or os.environ.get("RANK", "0") != "0":
        return
    for item in spec.split(","):
        name, _, seconds = item.partition(":")
        if name.strip() == where:
            print(f"fewstep: [test] rank 0 delayed {seconds} s at {where}", flush=True)
            time.sleep(float(seconds))
