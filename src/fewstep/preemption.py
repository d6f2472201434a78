"""Preemption: SIGUSR1 (Slurm's warning before the end of a time slot), SIGTERM and a first Ctrl-C (SIGINT) only set
a flag.

The handlers are installed when the process starts (`launcher/train.py` does it before importing anything heavy), so
a signal during model loading or engine set-up is not fatal: the loop agrees on the flag across ranks once per step,
saves a checkpoint and exits (0 for SIGUSR1/SIGTERM, 75 under Slurm's scripts; 130 after Ctrl-C), and a requeued
job resumes from it. A signal before the first step exits without a checkpoint, since there is nothing new to save:
after the data preparation (whose cache fill ends after its current batch), before the model loads, or after the
engine is built. A second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
INTERRUPTED_EXIT = 130  # a shell's status for a process stopped by Ctrl-C
_state = {"requested": False, "signal": None, "interrupts": 0}


def _handler(signum, frame) -> None:
    if signum == signal.SIGINT:
        _state["interrupts"] += 1
        if _state["interrupts"] > 1:  # the second Ctrl-C
            raise KeyboardInterrupt
        if os.environ.get("RANK", "0") == "0":  # a terminal's Ctrl-C reaches every rank: one line
            # a line of its own: the progress bar's line on stderr has no newline yet
            print("\nfewstep: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: at once, without "
                  "one)", file=sys.stderr, flush=True)
    # the first signal names the stop: torchrun's agent answers a Ctrl-C with SIGTERM to every worker (and SIGKILL
    # 30 s later), which the workers' own SIGINT from the terminal precedes
    _state["requested"], _state["signal"] = True, _state["signal"] or signal.Signals(signum).name


def install() -> None:
    """Install the handlers (idempotent; only possible from the main thread)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)


def requested() -> bool:
    return _state["requested"]


def received() -> str | None:
    """The name of the signal received, if any."""
    return _state["signal"]


def clear() -> None:
    """Forget a handled request (a second training in the same process starts clean)."""
    _state["requested"], _state["signal"], _state["interrupts"] = False, None, 0
