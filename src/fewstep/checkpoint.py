"""Atomic, resumable checkpoints.

Layout: `<output_dir>/checkpoints/step-<N>/` holds DeepSpeed's engine state (tag `state`: module, optimizer and LR
scheduler, per-rank shards under ZeRO), each rank's `rank<r>.pt` (EMA partition, RNG states, data and timestep-sampler
cursors) and `trainer.json`; `<output_dir>/checkpoints/latest` names the newest complete one.

Atomicity: everything is written into `.tmp-step-<N>/`; only after every rank has finished does rank 0 rename it to
`step-<N>` and then replace `latest` (itself written to a temporary file first). A kill at any moment leaves the last
completed checkpoint and `latest` intact; stale `.tmp-*` folders are removed at the next save. Re-saving a step
renames its old copy aside (`.replaced-step-<N>`) until the new one is in place, and `resolve` puts it back if the
commit stopped in between. Which files a checkpoint holds, and who writes each: `fewstep.checkpoint_files`.

Durability: on a shared filesystem a rename can reach the server before another client's file data does, so each rank
fsyncs the files it wrote and the checkpoint's directories before the barrier that precedes the rename, and rank 0
fsyncs the checkpoints root after the rename and again after replacing `latest`. `trainer.json` records the world size,
ZeRO stage and every file a complete checkpoint holds; `resolve` trusts a checkpoint only if all of them are there.

Resume compatibility: `trainer.json` also records what fixes the checkpoint's layout (model, LoRA shape, ZeRO
stage, world size, dtype, optimizer; `fewstep.checkpoint_layout`). LoRA runs add `trainable.pt`, their trainable
state in a stage-independent form, and every rank file with an EMA holds the map of its pieces.
`fewstep.checkpoint_resume.find_resume` compares the record with the new run and refuses or plans a reshard
(`fewstep.reshard`); its `restore` carries it out.

A full disk: a save first checks the free space against the last checkpoint's size (or an estimate; set
FEWSTEP_CHECKPOINT_SPACE_CHECK=0 to skip), and a write that fails anyway (ENOSPC, a lost mount) on any rank is
reported on every rank after DeepSpeed's collectives have run their course: the partial `.tmp-step-N` is removed,
the previous checkpoint and `latest` are untouched, and every rank raises `CheckpointWriteError` with one message.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Iterable

from fewstep import checkpoint_space as space
from fewstep import faults, reshard, rng_streams
from fewstep.checkpoint_layout import TRAINABLE_FILE, ResumeMismatch, run_layout  # noqa: F401
from fewstep.checkpoint_files import fsync, fsync_own_files, listing, manifest, missing_files
from fewstep.paths import write_atomic
from fewstep.checkpoint_space import CheckpointWriteError  # noqa: F401
from fewstep.engine import distributed
from fewstep.errors import UserError

ENGINE_TAG = "state"


def _barrier():
    # Ranks write shards of very different sizes (under ZeRO-1/2 rank 0 writes the whole module state): a store-based
    # wait, not a collective bound by the process-group timeout.
    distributed.wait_for_all("checkpoint")


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    steps = [d for d in os.listdir(root) if d.startswith("step-") and d[5:].isdigit()]
    return [os.path.join(root, d) for d in sorted(steps, key=lambda d: int(d[5:]))]


def step_of(path: str) -> int:
    return int(os.path.basename(path)[len("step-"):])


def later_than(root: str, step: int) -> list[str]:
    """Names of the checkpoints above `step`: an earlier run's, when this one resumed from an earlier step."""
    return [os.path.basename(p) for p in list_checkpoints(root) if step_of(p) > step]


def save(root: str, step: int, engine, rank: int, rank_state: dict, trainer_state: dict, keep: int,
         abandoned: Iterable[str] = ()) -> str:
    """Write checkpoint `step` collectively (every rank calls this). Returns the final directory.

    `trainer_state["layout"]` (from `run_layout`) is recorded; with model_type lora the stage-independent
    trainable.pt is written too. `abandoned` (rank 0's): names of checkpoints an earlier run wrote after the step
    this run resumed from; recorded, and never counted or pruned as this run's past. Raises CheckpointWriteError on
    every rank if the save cannot start or fails.
    """
    abandoned = sorted(abandoned)
    rng = rng_streams.state()  # the loop's, before anything below (DeepSpeed's save, the gathers) could draw
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):
            if d.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    _barrier()
    layout = trainer_state.get("layout") or {}
    trainable = reshard.gather_trainable(engine, rank) if layout.get("model_type") == "lora" else None  # collective
    ema_map = reshard.fragment_map(engine) if rank_state.get("ema") is not None else None
    previous = next((p for p in reversed(list_checkpoints(root)) if not missing_files(p)), None) if rank == 0 else None
    space.check(root, step, previous,  # collective: rank 0 decides, every rank refuses together
                lambda: space.estimated_bytes(engine, trainable, rank_state.get("ema") is not None))
    errors: list = []
    # DeepSpeed's save runs collectives: a failed write must not skip them; its barriers wait for rank 0's writes
    with space.deferred_errors(engine, errors), distributed.deepspeed_barriers_wait("checkpoint (DeepSpeed)"):
        faults.work_at("deepspeed-save")
        engine.save_checkpoint(tmp, tag=ENGINE_TAG, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
    writing = tmp
    if not errors:
        try:
            extra = {"ema_map": ema_map} if ema_map is not None else {}
            writing = os.path.join(tmp, f"rank{rank}.pt")
            space.save_torch({**rank_state, **extra, "rng": rng}, writing)
            if rank == 0:
                if trainable is not None:
                    writing = os.path.join(tmp, TRAINABLE_FILE)
                    space.save_torch(trainable, writing)
                writing = os.path.join(tmp, "trainer.json")
                world = distributed.world_size()
                meta = {**trainer_state, "step": step, "world_size": world, "abandoned": abandoned,
                        "zero_stage": engine.zero_optimization_stage(), "ema": rank_state.get("ema") is not None,
                        "ema_maps": ema_map is not None, "files": manifest(tmp, world)}
                write_atomic(os.path.join(tmp, "trainer.json"), json.dumps(meta, indent=1))
            writing = tmp
            fsync_own_files(tmp, rank)
        except Exception as e:  # noqa: BLE001 - reported below on every rank; the others must not hang
            errors.append((getattr(e, "filename", None) or writing, e))
    faults.work_at("checkpoint")
    _barrier()
    failures = [f for f in distributed.all_gather_object(space.describe(errors, rank, tmp) if errors else None) if f]
    if failures:
        message = None
        if rank == 0:  # composed by rank 0 alone, so every rank raises the very same words
            shutil.rmtree(tmp, ignore_errors=True)
            message = (f"checkpoint step-{step} was not saved: {failures[0]}. {space.intact(root)}, and the partial "
                       f".tmp-step-{step} was removed ({space.free(root)} free now on {root}). {space.remedy(root)}")
        _barrier()
        raise CheckpointWriteError(distributed.broadcast_object(message))
    faults.crash_if("FEWSTEP_FAULT_IN_SAVE", step)  # fault injection for the atomicity test
    failed = None
    if rank == 0:
        try:
            failed = _commit(root, final, tmp, keep, abandoned)
        except OSError as e:
            failed = f"{e} ({space.free(root)} free on {root})"
        if failed:
            failed = f"checkpoint step-{step} could not be made current: {failed}. {space.intact(root)}"
    _barrier()
    failed = distributed.broadcast_object(failed)
    if failed:
        raise CheckpointWriteError(failed)
    return final


REPLACED = ".replaced-"  # a step's previous copy while a re-save of that step is made current


def _commit(root: str, final: str, tmp: str, keep: int, abandoned: Iterable[str] = ()) -> str | None:
    """Rank 0: rename the finished checkpoint into place, point `latest` at it, prune. Returns an error or None."""
    replaced = None
    if os.path.exists(final):  # re-saving a step (preempted at a skipped step right after a save): the old copy is
        replaced = os.path.join(root, REPLACED + os.path.basename(final))  # renamed aside, not deleted, until the
        shutil.rmtree(replaced, ignore_errors=True)                       # new one is in place (a 20B copy takes
        os.replace(final, replaced)                                       # minutes to delete: a kill meanwhile
    os.replace(tmp, final)                                                # left no step-N at all)
    fsync(root)  # the rename is durable before `latest` can name it
    try:
        write_atomic(os.path.join(root, "latest"), os.path.basename(final))
    except OSError as e:  # its partial file is removed by write_atomic
        return (f"{os.path.basename(final)} is complete, but `latest` could not be updated ({e}; "
                f"{space.free(root)} free on {root}); resume_from_checkpoint {final} resumes it")
    fsync(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    # Prune this run's own past: steps below the one just written, the newest keep - 1 of them kept. Steps an earlier
    # run wrote after the one this run resumed from (`abandoned`, and any higher step) are not its past: pruning by
    # step number would delete the checkpoint just written, or this run's own older ones while keeping the
    # abandoned run's (with another checkpointing_steps, this run never re-saves those steps).
    step = step_of(final)
    abandoned = set(abandoned)
    older = [p for p in list_checkpoints(root) if step_of(p) < step and os.path.basename(p) not in abandoned]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return None


class IncompleteCheckpointError(UserError, FileNotFoundError):
    """An explicitly named checkpoint lacks files (a save that never finished, or a lost shard)."""


class CheckpointNotFound(UserError, FileNotFoundError):
    """resume_from_checkpoint names a directory that does not exist."""


class EarlierRunCheckpoints(UserError):
    """A fresh run (no resume_from_checkpoint) into a checkpoints folder that holds an earlier run's checkpoints."""


def resolve(root: str, spec: str | None) -> str | None:
    """'latest' -> the newest complete checkpoint under root (None if there is none); a path -> itself if complete.

    `latest` is trusted only if the checkpoint it names is complete; otherwise the newest complete one is used, with
    one warning line naming what is missing. An explicit path that is incomplete raises IncompleteCheckpointError.
    """
    if spec is None:
        return None
    if spec == "latest":
        return _resolve_latest(root)
    bare = re.fullmatch(r"(?:step|checkpoint)-(\d+)", spec)  # SimpleTuner's checkpoint-N too: one under root
    if bare and not os.path.exists(spec):
        spec = os.path.join(root, f"step-{bare.group(1)}")
    if os.path.isdir(os.path.join(spec, "checkpoints")) and not os.path.exists(os.path.join(spec, "trainer.json")):
        own = [os.path.basename(p) for p in list_checkpoints(os.path.join(spec, "checkpoints"))]
        raise CheckpointNotFound(f"resume_from_checkpoint: '{spec}' is a run's output directory, not a checkpoint: "
                                 f"give one of its checkpoints under {os.path.join(spec, 'checkpoints')} "
                                 f"({listing(own, 5) if own else 'it has none yet'}), or 'latest' to resume this "
                                 "run's own")
    if not os.path.isdir(spec):  # a re-save of exactly this step interrupted between its renames: put it back
        restore_replaced(os.path.dirname(os.path.abspath(spec)), os.path.basename(os.path.normpath(spec)))
    if not os.path.isdir(spec):
        import difflib

        own = [os.path.basename(p) for p in list_checkpoints(root)]
        hint = (" (did you mean 'latest'?)" if difflib.get_close_matches(spec, ["latest"], cutoff=0.7)
                else f" (this run's: {listing(own, 5)})" if own else "")
        raise CheckpointNotFound(f"resume_from_checkpoint: no checkpoint directory at '{spec}'{hint}")
    rank_files = glob.glob(os.path.join(glob.escape(spec), "rank*.pt"))
    if not os.path.exists(os.path.join(spec, "trainer.json")) and not rank_files:
        steps = [os.path.basename(p) for p in list_checkpoints(spec)]
        what = (f"a folder of checkpoints: give one of them ({listing(steps, 5)}), or 'latest'" if steps else
                "not a checkpoint (a checkpoint is a step-N folder under a run's checkpoints/; or give 'latest')")
        raise CheckpointNotFound(f"resume_from_checkpoint: '{spec}' is {what}")
    missing = missing_files(spec)
    if missing:
        raise IncompleteCheckpointError(f"resume_from_checkpoint: checkpoint '{spec}' is incomplete, missing "
                                        f"{listing(missing, 10)} (an interrupted save or a lost shard)")
    return spec


def restore_replaced(root: str, step_name: str | None = None) -> None:
    """A re-save interrupted between its two renames leaves the step only as `.replaced-step-N`: put it back (and
    drop copies whose step is back in place); `step_name`: only that step's."""
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(REPLACED) and step_name in (None, name[len(REPLACED):]):
            aside, final = os.path.join(root, name), os.path.join(root, name[len(REPLACED):])
            if os.path.exists(final):
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, final)
                print(f"fewstep: {os.path.basename(final)} restored from {name} (its re-save was interrupted)",
                      flush=True)


def _resolve_latest(root: str) -> str | None:
    restore_replaced(root)
    found = list_checkpoints(root)
    named = None
    if os.path.exists(os.path.join(root, "latest")):
        with open(os.path.join(root, "latest")) as fh:
            named = os.path.join(root, fh.read().strip())
    # `latest` first: the highest step can be older work (a run resumed from an earlier step); then newest first,
    # this run's own steps (at or below the one `latest` names) before a later run's
    ceiling = step_of(named) if named in found else float("inf")
    rest = [p for p in reversed(found) if p != named]
    candidates = ([named] if named in found else []) + [p for p in rest if step_of(p) <= ceiling] + \
        [p for p in rest if step_of(p) > ceiling]
    # Above it, a step that the checkpoint `latest` names does not record as an abandoned run's (`save`'s record;
    # older checkpoints have none) is this run's own, first: a save stopped between its rename and `latest`'s update
    abandoned = _recorded(named, "abandoned") if named in found else None
    if abandoned is not None:
        newer = [p for p in rest if step_of(p) > ceiling and os.path.basename(p) not in abandoned]
        candidates = newer + [p for p in candidates if p not in newer]
    skipped = []
    for path in candidates:
        missing = missing_files(path)
        if not missing:
            break
        skipped.append(f"{os.path.basename(path)} (missing {listing(missing, 3)})")
    else:
        path = None
    if skipped and distributed.rank() == 0:
        then = f"resuming from {os.path.basename(path)}" if path else "no complete checkpoint left, starting fresh"
        print(f"fewstep: warning: skipping incomplete checkpoint {'; '.join(skipped)}; {then}", flush=True)
    if named is not None and named not in found and distributed.rank() == 0:  # deleted by hand, or never finished
        then = f"resuming from {os.path.basename(path)}" if path else "no checkpoint left, starting fresh"
        print(f"fewstep: warning: `latest` names {os.path.basename(named)}, which is not there; {then}", flush=True)
    if path is not None and step_of(path) > ceiling and abandoned is not None and distributed.rank() == 0:
        print(f"fewstep: warning: {os.path.basename(path)} is complete but `latest` names {os.path.basename(named)} "
              f"(a save stopped before `latest` was updated); resuming from {os.path.basename(path)}", flush=True)
    return path


def _recorded(path: str, key: str):
    """`key` of the checkpoint's trainer.json (None if absent or unreadable)."""
    try:
        return read_meta(path).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def read_meta(path: str) -> dict:
    """The checkpoint's trainer.json."""
    with open(os.path.join(path, "trainer.json")) as fh:
        return json.load(fh)
