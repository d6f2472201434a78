"""Resuming from a checkpoint: `find_resume` plans it, `restore` carries the plan out.

`find_resume` resolves `resume_from_checkpoint` (`fewstep.checkpoint.resolve`) and compares the checkpoint's layout
record with the new run's (`fewstep.checkpoint_layout.plan`): it refuses or plans a reshard (`fewstep.reshard`).
`restore` loads the engine, the EMA and each rank's state as planned; a file that cannot be read ends in one
`DamagedCheckpointError` line naming an earlier checkpoint to resume from.
"""
from __future__ import annotations

import contextlib
import os
import pickle

import torch

from fewstep import checkpoint_space as space
from fewstep import reshard
from fewstep.checkpoint import (ENGINE_TAG, EarlierRunCheckpoints, list_checkpoints, read_meta, resolve,
                                restore_replaced, step_of)
from fewstep.checkpoint_files import inferred_files, listing
from fewstep.checkpoint_layout import TRAINABLE_FILE, Resume, plan
from fewstep.engine import distributed
from fewstep.engine.deepspeed_engine import replay_adam_bias_correction
from fewstep.errors import UserError


def _rank0_ema(path: str):
    """Rank 0's EMA state in the checkpoint (None: it kept none), memory-mapped: nothing else of the file is read."""
    return torch.load(os.path.join(path, "rank0.pt"), map_location="cpu", weights_only=False, mmap=True).get("ema")


def _load_engine(path: str, engine) -> None:
    with space.mapped_loads(engine):
        engine.load_checkpoint(path, tag=ENGINE_TAG, load_module_strict=False, load_optimizer_states=True,
                               load_lr_scheduler_states=True)


def load(path: str, engine, rank: int) -> tuple[dict, dict]:
    """Restore engine state (same layout); returns (this rank's state dict, trainer state). RNG is restored last by
    the caller."""
    _load_engine(path, engine)
    return read_rank_state(path, rank), read_meta(path)


def read_rank_state(path: str, rank: int) -> dict:
    """This rank's rank{rank}.pt, on the CPU and memory-mapped: the EMA shadow in it (a tenth of the model's fp32
    weights per rank on 8 GPUs) is copied into place from the page cache, never read whole into memory first. The
    caller drops it after the resume: held, the mapping would keep NFS from pruning that checkpoint."""
    rank_file = os.path.join(path, f"rank{rank}.pt")
    if not os.path.exists(rank_file):
        raise RuntimeError(f"{path} has no state for rank {rank}: was it written with a different world size?")
    return torch.load(rank_file, map_location="cpu", weights_only=False, mmap=True)


def apply_configured_settings(engine, cfg) -> list[str]:
    """Train on from a checkpoint with this run's optimizer settings; returns what changed since the checkpoint
    (`learning_rate 0.001 -> 1e-05`, ...) for the start-up log.

    DeepSpeed's load restores the saved param groups (learning rate, betas, eps, weight decay) and the LR schedule's
    base rate, `reshard.apply_trainable` (another world size, stage or optimizer) the schedule's base rate, so a resume
    with a lowered learning_rate (what a diverged run is told to do) would train at the old one. The schedule keeps its
    position: the rate becomes the new base rate times the schedule's factor at that step (the factor is this run's
    `lr_lambda`, a function of the config: never saved)."""
    sched = engine.lr_scheduler
    if sched is None or not hasattr(sched, "lr_lambdas"):
        return []
    wanted = {"learning_rate": ("initial_lr", cfg.learning_rate),
              "adam_beta1/adam_beta2": ("betas", (cfg.adam_beta1, cfg.adam_beta2)),
              "adam_epsilon": ("eps", cfg.adam_epsilon), "adam_weight_decay": ("weight_decay", cfg.adam_weight_decay)}
    groups = sched.optimizer.param_groups
    saved = {**groups[0], "initial_lr": sched.base_lrs[0]}  # the schedule's base rate is the one it trains from
    changes = [f"{name} {_setting(saved[key])} -> {_setting(value)}" for name, (key, value) in wanted.items()
               if key in saved and _setting(saved[key]) != _setting(value)]
    sched.base_lrs = [cfg.learning_rate for _ in sched.base_lrs]
    for group in groups:
        group.update({key: value for key, value in wanted.values() if key in group or key == "initial_lr"})
    sched._last_lr = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(groups, sched._last_lr):
        group["lr"] = lr
    return changes


def _setting(value) -> str:
    return "/".join(f"{float(v):g}" for v in value) if isinstance(value, (tuple, list)) else f"{float(value):g}"


def in_own_folder(resume: Resume, root: str) -> bool:
    """Whether the checkpoint resumed from is one of this run's own (in its checkpoints folder `root`), not another
    run's named by resume_from_checkpoint."""
    return os.path.isdir(root) and os.path.samefile(os.path.dirname(os.path.abspath(resume.path)), root)


def find_resume(root: str, spec: str | None, layout: dict, use_ema: bool) -> Resume | None:
    """Resolve `resume_from_checkpoint` and compare the checkpoint's layout record with this run's (collective).

    Rank 0 decides and every rank gets the same answer: the plan (None: start fresh), or the same error raised on
    every rank (ResumeMismatch naming every differing key, IncompleteCheckpointError, CheckpointNotFound,
    EarlierRunCheckpoints), which launcher/train.py prints as one line. A fresh run is refused where an earlier run
    left checkpoints: its own would mix with them (`latest`, pruning, a later resume), or replace them.
    """
    outcome = None
    with distributed.uneven_work("resolve checkpoint"):  # rank 0 decides, so every rank loads the same one
        if distributed.rank() == 0:
            try:
                if spec is None:
                    restore_replaced(root)  # a step left only as its re-save's aside copy is an earlier run's too
                earlier = [os.path.basename(p) for p in list_checkpoints(root)] if spec is None else []
                if earlier:
                    raise EarlierRunCheckpoints(
                        f"{root} holds an earlier run's checkpoints ({listing(earlier, 5)}): continue that run with "
                        "resume_from_checkpoint latest, or start a new one in another output_dir (or move those "
                        "checkpoints away first)")
                path = resolve(root, spec)
                outcome = ("ok", _plan(path, layout, use_ema) if path else None)
            except UserError as e:
                outcome = ("error", type(e), str(e))
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise outcome[1](outcome[2])
    return outcome[1]


def _plan(path: str, layout: dict, use_ema: bool) -> Resume:
    meta = read_meta(path)
    files = meta["files"] if "files" in meta else inferred_files(path)
    saved_ema = meta.get("ema")
    if saved_ema is None:  # written before trainer.json said so: its rank0.pt is read to see
        with _damage_named(path):
            saved_ema = _rank0_ema(path) is not None
    return plan(path, meta, layout, files, saved_ema, bool(meta.get("ema_maps")), use_ema)


class DamagedCheckpointError(UserError):
    """A checkpoint file is there but cannot be read (truncated or overwritten after its save)."""


# what torch.load raises on a file that is not a whole checkpoint (an empty one: EOFError); memory-mapped, on one
# that is not a zip archive at all: "mmap can only be used with files saved with `torch.save(<path>, ...`"
_UNREADABLE = ("PytorchStreamReader failed", "failed finding central directory", "invalid header or archive")
_NOT_AN_ARCHIVE = "mmap can only be used with files saved with"


@contextlib.contextmanager
def _damage_named(path: str):
    """Reading a checkpoint's files: one that is not a whole torch file ends in one line naming the checkpoint and
    the way on, rather than a traceback from deep in torch or DeepSpeed."""
    try:
        yield
    except (EOFError, pickle.UnpicklingError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(m in str(e) for m in (*_UNREADABLE, _NOT_AN_ARCHIVE)):
            raise
        earlier = [c for c in list_checkpoints(os.path.dirname(os.path.abspath(path))) if step_of(c) < step_of(path)]
        why = ("not a torch zip archive" if _NOT_AN_ARCHIVE in str(e) else
               f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'empty or cut short'}")
        raise DamagedCheckpointError(
            f"resume_from_checkpoint: checkpoint '{path}' has a file that cannot be read ({why}); it was damaged "
            "after its save. "
            + (f"Resume from an earlier one beside it (resume_from_checkpoint {earlier[-1]}; also "
               f"{listing([os.path.basename(c) for c in earlier[:-1][::-1]], 3) or 'none'})" if earlier
               else "No earlier checkpoint is beside it to resume from") + ".") from e


def restore(resume: Resume, engine, rank: int, ema=None, seed: int = 0) -> tuple[dict, dict]:
    """Restore the engine (module, optimizer, LR schedule) and `ema` from the planned checkpoint, resharding as
    planned (collective). Returns (this rank's state: order, samplers, rng; trainer state). RNG is applied last by the
    caller. A file that cannot be read ends in a DamagedCheckpointError."""
    with _damage_named(resume.path):
        return _restore(resume, engine, rank, ema, seed)


def _restore(resume: Resume, engine, rank: int, ema, seed: int) -> tuple[dict, dict]:
    path = resume.path
    if resume.mode == "native" and resume.saved_world == distributed.world_size():
        rank_state, trainer_state = load(path, engine, rank)
        saved_ema = rank_state.pop("ema", None)
    elif resume.mode == "native":  # stage 0 on another world size: nothing is partitioned, the EMA neither
        _load_engine(path, engine)
        trainer_state = read_meta(path)
        rank_state = reshard.composed_rank_state(path, rank, resume.saved_world, seed, int(trainer_state["step"]))
        saved_ema = _rank0_ema(path)
    else:
        trainer_state = read_meta(path)
        if resume.mode == "trainable":
            # memory-mapped: each rank copies out its own slices; the file (GBs for a rank-64 Qwen-Image LoRA) is
            # read once per node through the page cache, not held whole by every rank
            reshard.apply_trainable(engine, torch.load(os.path.join(path, TRAINABLE_FILE), map_location="cpu",
                                                       weights_only=False, mmap=True))
        else:
            with distributed.uneven_work("universal checkpoint conversion"):
                if rank == 0:
                    reshard.convert_universal(path, ENGINE_TAG, resume.saved_world)
            reshard.load_universal(engine, path)
        rank_state = reshard.composed_rank_state(path, rank, resume.saved_world, seed, int(trainer_state["step"]))
        saved_ema = True if resume.reshard_ema else None
    if ema is not None:
        if saved_ema is None:  # the checkpoint kept no EMA: start it from the restored weights
            ema.reset()
            if rank == 0:
                print(f"fewstep: warning: {path} holds no EMA; use_ema starts one from the restored weights",
                      flush=True)
        elif resume.mode == "native":
            ema.load_state_dict(saved_ema)
        else:
            reshard.reshard_ema(ema, engine, path, resume.saved_world)
    replay_adam_bias_correction(engine)
    return rank_state, trainer_state
