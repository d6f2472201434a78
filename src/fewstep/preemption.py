"""Preemption: SIGUSR1 (Slurm's warning before the end of a time slot) and SIGTERM only set a flag.

The handlers are installed when the process starts (`launcher/train.py` does it before importing anything heavy), so
a signal during model loading or engine set-up is not fatal: the loop agrees on the flag across ranks once per step,
saves a checkpoint and exits 0, and a requeued job resumes from it. A signal before the first step exits at once,
since there is nothing new to save.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_state = {"requested": False, "signal": None}


def _handler(signum, frame) -> None:
    _state["requested"], _state["signal"] = True, signal.Signals(signum).name


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
    _state["requested"], _state["signal"] = False, None
