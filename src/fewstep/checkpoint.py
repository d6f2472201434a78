"""Atomic, resumable checkpoints.

Layout: `<output_dir>/checkpoints/step-<N>/` holds DeepSpeed's engine state (tag `state`: module, optimizer and LR
scheduler, per-rank shards under ZeRO), each rank's `rank<r>.pt` (EMA partition, RNG states, data and timestep-sampler
cursors) and `trainer.json`; `<output_dir>/checkpoints/latest` names the newest complete one.

Atomicity: everything is written into `.tmp-step-<N>/`; only after every rank has finished does rank 0 rename it to
`step-<N>` and then replace `latest` (itself written to a temporary file first). A kill at any moment leaves the last
completed checkpoint and `latest` intact; stale `.tmp-*` folders are removed at the next save.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from fewstep.engine import distributed

ENGINE_TAG = "state"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    # Ranks write shards of very different sizes (under ZeRO-1/2 rank 0 writes the whole module state): a store-based
    # wait, not a collective bound by the process-group timeout.
    distributed.wait_for_all("checkpoint")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    steps = [d for d in os.listdir(root) if d.startswith("step-") and d[5:].isdigit()]
    return [os.path.join(root, d) for d in sorted(steps, key=lambda d: int(d[5:]))]


def save(root: str, step: int, engine, rank: int, rank_state: dict, trainer_state: dict, keep: int) -> str:
    """Write checkpoint `step` collectively (every rank calls this). Returns the final directory."""
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):
            if d.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    _barrier()
    engine.save_checkpoint(tmp, tag=ENGINE_TAG, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save({**rank_state, "rng": rng_state()}, os.path.join(tmp, f"rank{rank}.pt"))
    if rank == 0:
        _write_atomic(os.path.join(tmp, "trainer.json"), json.dumps({**trainer_state, "step": step}, indent=1))
    _barrier()
    if os.environ.get("FEWSTEP_FAULT_IN_SAVE") == str(step):  # fault injection for the atomicity test
        os._exit(17)
    if rank == 0:
        if os.path.exists(final):  # re-saving the same step (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(os.path.join(root, "latest"), os.path.basename(final))
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resolve(root: str, spec: str | None) -> str | None:
    """'latest' -> the newest complete checkpoint under root (None if there is none); a path -> itself."""
    if spec is None:
        return None
    if spec == "latest":
        latest = os.path.join(root, "latest")
        if os.path.exists(latest):
            with open(latest) as fh:
                path = os.path.join(root, fh.read().strip())
            if os.path.isdir(path):
                return path
        found = list_checkpoints(root)
        return found[-1] if found else None
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint directory at '{spec}'")
    return spec


def load(path: str, engine, rank: int) -> tuple[dict, dict]:
    """Restore engine state; returns (this rank's state dict, trainer state). RNG is restored last by the caller."""
    engine.load_checkpoint(path, tag=ENGINE_TAG, load_module_strict=False, load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    rank_file = os.path.join(path, f"rank{rank}.pt")
    if not os.path.exists(rank_file):
        raise RuntimeError(f"{path} has no state for rank {rank}: was it written with a different world size?")
    rank_state = torch.load(rank_file, weights_only=False)
    with open(os.path.join(path, "trainer.json")) as fh:
        trainer_state = json.load(fh)
    return rank_state, trainer_state
