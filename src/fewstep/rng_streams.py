"""A rank's training randomness (noise, timesteps, caption dropout, LoRA init) is one stream: the global generators
(torch CPU, this rank's CUDA device, Python's `random`, NumPy) seeded once from (seed, rank).

Work that is not training must not draw from that stream, or the same seed would give another run depending on
things that have nothing to do with the maths: a library's initialisers run while loading (their number differs
between diffusers versions and between the CPU and `device_map` load paths), a cache fill that only some ranks or
only a first run do, a validation turned on or off, a checkpoint taken or not. The trainer therefore snapshots the
stream right after seeding and restores it after set-up, and runs validation, exports and checkpoint saves inside
`isolated()`. A checkpoint stores `state()`; a resume puts it back last.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def state() -> dict:
    """The global generators' state (what a checkpoint stores per rank)."""
    snapshot = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():  # this rank's GPU only: a resume may see other GPUs, or its own under another index
        snapshot["cuda"] = torch.cuda.get_rng_state()
    return snapshot


def set_state(snapshot: dict) -> None:
    """Put the global generators back to a `state()` snapshot (CUDA's only where this process has CUDA, into this
    rank's current GPU)."""
    torch.set_rng_state(snapshot["torch"])
    random.setstate(snapshot["python"])
    np.random.set_state(snapshot["numpy"])
    cuda = snapshot.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-12-05 hold every visible GPU's: take ours
            here = torch.cuda.current_device()
            cuda = cuda[here] if here < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s stream: distinct per rank for one `seed`, and per `seed` for one rank; seed * 7919 +
    rank cannot collide between two (seed, rank) pairs while the world size stays below 7919."""
    return int(seed) * 7919 + int(rank)


def seed(value: int) -> dict:
    """Seed every global generator from `value`; returns the seeded state."""
    torch.manual_seed(value % 2 ** 64)  # the CPU generator and every CUDA device's (unsigned 64-bit seeds)
    random.seed(value)
    np.random.seed(value % 2 ** 32)
    return state()


@contextlib.contextmanager
def isolated():
    """Whatever the block draws from the global generators, they leave it as they entered (also on error)."""
    snapshot = state()
    try:
        yield
    finally:
        set_state(snapshot)
