"""A full disk loses nothing: checkpoint saves check the free space first and survive a failed write.

- Before a save, rank 0 compares the free space on the checkpoints root with the newest complete checkpoint's size
  (or, for the first save, an estimate from the optimizer partitions) and every rank refuses to start a save that
  cannot fit. FEWSTEP_CHECKPOINT_SPACE_CHECK=0 skips the check (for filesystems that misreport their free space).
- A write that fails anyway (ENOSPC, a quota, a lost mount) must not leave the other ranks waiting in one of
  DeepSpeed's collectives (`save_checkpoint` ends in a barrier): its file writes are recorded instead of raised
  (`deferred_errors`), every rank reports after the writes, and all raise `CheckpointWriteError` with the same
  message. `fewstep.checkpoint.save` then removes the partial `.tmp-step-N`; the previous checkpoint and `latest`
  were never touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch

from fewstep.engine import distributed
from fewstep.engine.deepspeed_engine import inner_optimizer, master_partitions
from fewstep.engine.nonfinite import overridden
from fewstep.errors import UserError

SPACE_CHECK_ENV = "FEWSTEP_CHECKPOINT_SPACE_CHECK"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (a full disk, ...); earlier checkpoints are intact. Every rank raises it with
    the same message, which launcher/train.py prints as one line."""


@contextlib.contextmanager
def deferred_errors(engine, errors: list):
    """Record instead of raising the failures of DeepSpeed's checkpoint file writes (its `checkpoint_engine.save`
    and the recovery-script copy): `save_checkpoint` ends in a barrier that a rank raising half way would never
    reach. Once a write failed, later ones are skipped. DeepSpeed's default engine (one `torch.save(state, path)`)
    writes through a Python file object here, so that a failed write keeps its OSError (errno) instead of becoming
    torch's bare "file write failed"."""
    ce = engine.checkpoint_engine
    if type(ce).__name__ == "TorchCheckpointEngine":
        def write(state_dict, path):
            save_torch(state_dict, path, _use_new_zipfile_serialization=getattr(ce, "zipfile_serialization", True))
    else:
        write = getattr(ce, "save", None)
    patched = []
    for obj, name, original in ((ce, "save", write), (engine, "_copy_recovery_script",
                                                      getattr(engine, "_copy_recovery_script", None))):
        if original is None:
            continue

        def guarded(*args, _original=original, **kwargs):
            if errors:
                return None
            try:
                return _original(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported on every rank once DeepSpeed's collectives are done
                path = next((a for a in args if isinstance(a, str)), None)  # the file being written, or its folder
                errors.append((getattr(e, "filename2", None) or path or getattr(e, "filename", None), e))
                return None
        patched.append((obj, name, vars(obj).get(name)))
        setattr(obj, name, guarded)
    try:
        yield
    finally:
        for obj, name, own in patched:
            if own is None:
                delattr(obj, name)  # the class's method shows through again
            else:
                setattr(obj, name, own)


@contextlib.contextmanager
def mapped_loads(engine):
    """DeepSpeed's module-states reads (its `checkpoint_engine.load`: a plain `torch.load`) memory-mapped for the
    block: every rank reads the whole file, a ZeRO-1/2 full model (40 GB in bf16 at 20B), so 8 ranks of a node held 8
    copies in RAM at once; mapped, they share the page cache and keep only what they copy into the model. Optimizer
    partitions are read as before (a CPU optimizer would keep mapped moments), and so is a file in torch's legacy
    format, which cannot be mapped."""
    ce = engine.checkpoint_engine
    if type(ce).__name__ != "TorchCheckpointEngine" or engine.zero_optimization_stage() not in (1, 2):
        yield  # ZeRO-0 keeps the optimizer state in the module-states file; ZeRO-3's holds no weights
        return

    def load(path, map_location=None):
        if "model_states" in os.path.basename(path):  # not the optimizer partitions: a CPU optimizer would keep
            try:                                         # its moments mapped, holding the old file all run long
                return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
            except RuntimeError:  # not a zipfile checkpoint
                pass
        return torch.load(path, map_location=map_location, weights_only=False)

    with overridden(ce, {"load": load}):
        yield


def check_enabled() -> bool:
    return os.environ.get(SPACE_CHECK_ENV, "1").lower() not in ("0", "off", "false", "no")


def os_error(error: BaseException) -> OSError | None:
    """The first OSError with an errno in `error`'s chain (torch wraps a failed write in a RuntimeError)."""
    cause, seen = error, 0
    while cause is not None and not (isinstance(cause, OSError) and cause.errno) and seen < 8:
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return cause if isinstance(cause, OSError) and cause.errno else None


def os_reason(error: BaseException) -> str:
    """'[Errno 28] No space left on device' for `error`'s OSError, else the error itself."""
    cause = os_error(error)
    if cause is not None:
        return f"[Errno {cause.errno}] {cause.strerror or os.strerror(cause.errno)}"
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def torch_saves_keeping_errno():
    """Within the block, `torch.save(obj, path)` writes through a Python file object, so that a failed write raises
    its OSError (ENOSPC) instead of torch's bare RuntimeError ("iostream error"): for library code that saves by path
    (DeepSpeed's universal-checkpoint converter). Process-wide: use it where nothing else saves meanwhile."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                return original(obj, fh, *args, **kwargs)
        return original(obj, f, *args, **kwargs)

    with overridden(torch, {"save": save}):
        yield


def save_torch(obj, path: str, **kwargs) -> None:
    """`torch.save` through a Python file object: a failed write raises with the OSError (e.g. ENOSPC) attached."""
    with open(path, "wb") as fh:
        torch.save(obj, fh, **kwargs)


def describe(errors: list, rank: int, tmp: str) -> str:
    """'rank 1 could not write state/x.pt: [Errno 28] No space left on device' for the first recorded failure."""
    path, e = errors[0]
    where = os.path.relpath(path, tmp) if path and str(path).startswith(tmp) else path
    where = "its files (fsync)" if where in (".", None) else where
    return f"rank {rank} could not write {where}: {os_reason(e)}"


def free(root: str) -> str:
    try:
        return human(shutil.disk_usage(root).free)
    except OSError:
        return "unknown space"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _newest(root: str) -> str | None:
    """The checkpoint `latest` names, else the newest step-N folder; None where `root` holds none."""
    from fewstep.checkpoint import list_checkpoints  # it imports this module

    try:
        with open(os.path.join(root, "latest")) as fh:
            return fh.read().strip()
    except OSError:
        steps = list_checkpoints(root)  # by step number
        return os.path.basename(steps[-1]) if steps else None


def intact(root: str) -> str:
    """What a failed save left of the saved state, for its message."""
    named = _newest(root)
    return f"Nothing was lost: {named} and `latest` are unchanged" if named else "There is no earlier checkpoint there"


def remedy(root: str) -> str:
    """What to do after a save failed for want of space, for its message."""
    if _newest(root):
        return "Free some space (or lower checkpoints_total_limit) and resume with resume_from_checkpoint latest"
    return "Free some space and start the run again as it was started (the same resume_from_checkpoint)"


def checkpoint_bytes(path: str) -> int:
    """The size of a complete checkpoint: the files its trainer.json lists."""
    try:
        with open(os.path.join(path, "trainer.json")) as fh:
            files = json.load(fh).get("files")
    except (OSError, ValueError):
        files = None
    if files is None:
        files = [os.path.relpath(os.path.join(h, n), path) for h, _, names in os.walk(path) for n in names]
    return sum(os.path.getsize(os.path.join(path, f)) for f in files if os.path.isfile(os.path.join(path, f)))


def estimated_bytes(engine, trainable: dict | None, with_ema: bool) -> int:
    """A first save's size, from this rank's optimizer partition times the world size, plus the module's trainable
    weights, trainable.pt and the small files (DeepSpeed's recovery scripts, RNG states)."""
    inner = inner_optimizer(engine)
    per_rank = 0
    for m in master_partitions(engine):
        per_rank += m.numel() * m.element_size() * (2 if with_ema else 1)
        per_rank += sum(t.numel() * t.element_size() for t in inner.state.get(m, {}).values() if torch.is_tensor(t))
    module = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size()
                 for p in engine.module.parameters() if p.requires_grad)
    stage_independent = sum(t.numel() * 4 for v in trainable["params"].values() for t in v.values()) if trainable else 0
    return distributed.world_size() * (per_rank + 16 * 1024) + module + stage_independent + 48 * 1024


def check(root: str, step: int, previous: str | None, estimate) -> None:
    """Refuse, on every rank, to start a save that cannot fit (collective; rank 0 decides): the free space on `root`
    against the newest complete checkpoint `previous` (rank 0's argument), or `estimate()` for the first save."""
    verdict = None
    if distributed.rank() == 0 and check_enabled():
        if previous is not None:
            need, basis = checkpoint_bytes(previous), f"the size of {os.path.basename(previous)}"
        else:
            need, basis = estimate(), "estimated from the optimizer state"
        available = shutil.disk_usage(root).free
        if available < need:
            verdict = (f"checkpoint step-{step} was not started: it needs about {human(need)} ({basis}) but only "
                       f"{human(available)} is free on {root}. {intact(root)}. {remedy(root)} "
                       f"({SPACE_CHECK_ENV}=0 skips this check)")
    verdict = distributed.broadcast_object(verdict)
    if verdict:
        raise CheckpointWriteError(verdict)
