"""The run directory: one set of paths for every rank, one run at a time, and all ranks able to see it.

- Paths: rank 0 expands and absolutises `output_dir`, `cache_dir` and `logging_dir` and every rank uses its answer, so
  ranks started in different working directories (or with different environments) cannot write to different places.
- Lock: rank 0 holds an `flock` on `<output_dir>/.fewstep.lock` (the `filelock` package) for the run's lifetime. A
  second run on the same directory stops at once, naming the first run's host, PID and Slurm job. The kernel drops
  an flock with its process, so a run killed with -9 (or a requeued Slurm job) never blocks its own resume; a Slurm
  job requeued after a node failure waits for the dead node's lock to lapse on a shared filesystem.
- Shared: every rank writes its checkpoint shard under output_dir and rank 0 assembles them, so all ranks must see
  the same directory (a node-local output_dir in a multi-node job is refused by name).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from fewstep import paths
from fewstep.engine import distributed
from fewstep.engine.sharing import sharing_group
from fewstep.engine.distributed import DistInfo
from fewstep.errors import RunDirBusy, UserError
from fewstep.jsonfile import save_json

LOCK_NAME = ".fewstep.lock"
OWNER_NAME = ".fewstep-owner.json"  # who holds the lock (the lock file itself is truncated by every opener)


def resolve_paths(cfg, info: DistInfo) -> None:
    """Replace cfg's path options by rank 0's absolute, expanded values (collective). A variable that rank 0 does not
    have (`$SLURM_TMPDIR` is a site's, not Slurm's) is an error on every rank: `expandvars` would leave it as text,
    and the run would write to a folder literally named `$SLURM_TMPDIR` under the working directory."""
    keys = ("output_dir", "cache_dir", "logging_dir")
    mine = {k: (getattr(cfg, k), os.path.abspath(paths.expand(getattr(cfg, k)))) if getattr(cfg, k) else None
            for k in keys}
    for k, v in distributed.broadcast_object(mine).items():
        problem = paths.unexpanded(v[1]) if v is not None else None
        if problem:
            raise UserError(f"{k} {v[0]!r}: {problem} (on rank 0, which expands the paths for every rank)")
        setattr(cfg, k, None if v is None else v[1])


def _restart_count() -> int:
    """How often Slurm has requeued this job (SLURM_RESTART_COUNT; 0 outside Slurm)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": _restart_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_owner(output_dir: str) -> dict | None:
    """The lock holder's `_owner()` record, or None if it cannot be read."""
    try:
        with open(os.path.join(output_dir, OWNER_NAME)) as fh:
            owner = json.load(fh)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe_owner(owner: dict | None) -> str:
    if owner is None:
        return "another process (its owner file is unreadable)"
    job = f", Slurm job {owner['slurm_job']}" if owner.get("slurm_job") else ""
    return f"PID {owner.get('pid')} on {owner.get('host')}{job}, started {owner.get('started')}"


def _make_dir(key: str, path: str) -> str | None:
    """Create the folder `path` (option `key`); why it cannot be, or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{key} '{path}' exists and is not a directory"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"cannot create {key} '{path}': {e.strerror or e}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{key} '{path}' is not writable"
    return None


def _acquire(output_dir: str, other_dirs: dict[str, str | None] | None = None):
    """Rank 0: create output_dir (and `other_dirs`: {option: path}) and take output_dir's lock. Returns (lock or
    None, error message or None)."""
    from filelock import FileLock, Timeout

    for key, path in {"output_dir": output_dir, **(other_dirs or {})}.items():
        problem = _make_dir(key, path) if path else None
        if problem:
            return None, problem
    try:  # filelock >= 4 would fall back to a marker file where flock is missing: a SIGKILLed run's marker stays, and
        # every later run (a requeue included) would be refused until someone deletes it; run unguarded instead
        lock = FileLock(os.path.join(output_dir, LOCK_NAME), timeout=0, fallback_to_soft=False)
    except TypeError:  # an older filelock: flock or an error, no marker
        lock = FileLock(os.path.join(output_dir, LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = _read_owner(output_dir)
        owner, wait = _describe_owner(holder), _requeue_wait(holder)
        if wait is None:
            return None, (f"output_dir '{output_dir}' is in use by another fewstep run ({owner}); wait for it to "
                          "finish, stop it, or choose another output_dir")
        print(f"fewstep: output_dir '{output_dir}' is still locked by this Slurm job's run before its requeue "
              f"({owner}; its node failed?); waiting up to {wait:.0f} s for the filesystem to release the lock",
              flush=True)
        try:
            lock.acquire(timeout=wait, poll_interval=min(5.0, max(wait, 0.1) / 10))
        except Timeout:
            return None, (f"output_dir '{output_dir}' is still locked by this Slurm job's run before its requeue "
                          f"({owner}) after {wait:.0f} s: if that node is gone for good, remove "
                          f"{os.path.join(output_dir, LOCK_NAME)}, or wait longer (FEWSTEP_REQUEUE_LOCK_WAIT)")
    except OSError as e:  # a filesystem without flock support: run unlocked rather than not at all
        print(f"fewstep: warning: cannot lock '{output_dir}' ({e}); running without the one-run-per-directory "
              "guard", flush=True)
        return None, None
    save_json(os.path.join(output_dir, OWNER_NAME), _owner())  # atomic: a run refused now reads all of it or none
    return lock, None


def _requeue_wait(owner: dict | None) -> float | None:
    """Seconds to wait for a lock held by this Slurm job's run before its latest requeue (None: do not wait; another
    run, or another step of this same run of the job, holds it). A job requeued after a node failure restarts with
    its job id and a higher SLURM_RESTART_COUNT while the dead node's lock may linger on a shared filesystem until
    its lease ends (NFSv4: ~90 s; Lustre: until the client is evicted). FEWSTEP_REQUEUE_LOCK_WAIT (seconds, default
    600) bounds the wait."""
    job = os.environ.get("SLURM_JOB_ID")
    if owner is None or not job or str(owner.get("slurm_job")) != job:
        return None
    earlier = owner.get("slurm_restart", 0)  # absent in owner files of versions before 2026-12-06: the first run
    if not isinstance(earlier, int) or earlier >= _restart_count():
        return None
    value = os.environ.get("FEWSTEP_REQUEUE_LOCK_WAIT", "600")
    try:
        return max(float(value), 0.0)
    except ValueError:
        raise UserError(f"FEWSTEP_REQUEUE_LOCK_WAIT={value!r}: expected a number of seconds") from None


@contextlib.contextmanager
def locked(output_dir: str, info: DistInfo, other_dirs: dict[str, str | None] | None = None):
    """Hold the run directory for the block (collective: every rank enters; rank 0 holds the lock, which it may wait
    for after a requeue: the others wait without a collective timeout). `other_dirs` ({option: path}: cache_dir,
    logging_dir) are created by rank 0 first, so a path under a file fails now, not after the model load."""
    with distributed.uneven_work("run directory lock"):
        lock, problem = _acquire(output_dir, other_dirs) if info.is_main else (None, None)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise RunDirBusy(problem) if "in use" in problem else UserError(problem)
    try:
        require_shared(output_dir, info)
        yield
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(output_dir, OWNER_NAME))
            lock.release()


def require_shared(output_dir: str, info: DistInfo) -> None:
    """All ranks must see one output_dir (checkpoints are written by every rank and assembled by rank 0)."""
    group = sharing_group(output_dir)
    if group.size != info.world_size:
        raise UserError(f"output_dir '{output_dir}' is not shared by all {info.world_size} ranks (rank {info.rank} "
                        f"sees ranks {group.members} there): checkpoints are written by every rank and assembled by "
                        "rank 0, so put output_dir on a filesystem every node mounts (cache_dir may be node-local)")
