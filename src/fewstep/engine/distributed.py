"""The process group, and every collective fewstep itself issues (DeepSpeed issues its own).

Three rules keep multi-GPU and multi-node runs honest, and CPU + gloo tests able to guard them:

- **Tensors go on the communication device.** NCCL only takes CUDA tensors (a CPU tensor raises "No backend type
  associated with device type cpu"), gloo takes CPU ones. `comm_device()` asks the default group which device types
  it serves, so the same code is right under both; nothing outside this module calls `torch.distributed` directly
  (a test scans the sources for that).
- **One reduction per optimizer step.** `reduce_step` carries the logged means and the flags (preemption, ...) in
  one tensor, so every rank takes the same decisions from the same numbers.
- **Long, uneven waits do not use collectives.** While rank 0 writes an export or decodes a validation image, or
  each rank fills its share of the data cache, the others wait in `wait_for_all`: a barrier over the rendezvous
  store that polls without a deadline (a heartbeat line every few minutes), instead of a collective that the
  process-group timeout (`distributed_timeout_seconds`) would kill. If a rank fails inside `uneven_work`, the
  others stop with its message instead of waiting for ever.

Rank, world size, rendezvous address and device come from the launcher (`fewstep.engine.launch`).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fewstep.engine import liveness
from fewstep.engine.launch import launch_env, local_device
from fewstep.errors import exit_status


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_launch_local_rank = [None]  # the launcher's LOCAL_RANK (setup_distributed may hand DeepSpeed another value)
RENDEZVOUS_SECONDS = 1800.0


def setup_distributed(timeout_seconds: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU) with the given collective timeout."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(launch_env(dict(os.environ)))
    if os.environ["WORLD_SIZE"] == "1" and int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
            and "SLURM_STEP_ID" not in os.environ:
        print(f"fewstep: this Slurm job has {os.environ['SLURM_NTASKS']} tasks, but this process was started "
              "without srun: training as a single process (use slurm/common.sh or srun for all tasks)", flush=True)
    import deepspeed
    import deepspeed.ops

    quiet_deprecated_collectives()
    # On CPU, DeepSpeed would JIT-build a shared-memory comm op at init (~50 s, no benefit for training): skip it.
    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ["LOCAL_RANK"])
    _launch_local_rank[0] = local_rank
    device = local_device(local_rank)
    if cuda:
        torch.cuda.set_device(device)
        # DeepSpeed takes its GPU from LOCAL_RANK (init_process_group's device_id, the engine, zero.Init): give it
        # the index chosen here, which differs where a task sees fewer GPUs than its node runs tasks (one bound per
        # task). DistInfo keeps the launcher's local rank.
        os.environ["LOCAL_RANK"] = str(device.index)
    if not dist.is_initialized():
        # The rendezvous waits at least RENDEZVOUS_SECONDS for every rank (nodes start minutes apart: a late node,
        # imports from a shared filesystem); the collective timeout applies from the first collective on.
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                   timeout=timedelta(seconds=max(timeout_seconds, RENDEZVOUS_SECONDS)))
        if timeout_seconds < RENDEZVOUS_SECONDS:
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_seconds))
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        # ZeRO's gradient reductions and weight all-gathers run on DeepSpeed's clone of the world group, which it
        # would make without a timeout (torch's default then: 10 minutes under NCCL): make it here, with the run's.
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(world_size())),
                                             timeout=timedelta(seconds=timeout_seconds))
    if world_size() > 1:  # a rank that dies silently is noticed by the others' waits
        liveness.start(_store(), rank(), max(timeout_seconds, liveness.MIN_SECONDS))
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def quiet_deprecated_collectives() -> None:
    """DeepSpeed 0.19.8's ZeRO-3 gathers and reduce-scatters call torch.distributed's older names, which torch 2.13
    deprecates with a FutureWarning per call (dozens a step): nothing a user can act on, and it buries the log."""
    deprecated = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)


def teardown() -> None:
    """Destroy the process group before the interpreter exits (gloo can otherwise abort a rank at exit with
    "terminate called without an active exception" after everything has finished).

    Called when this rank has finished well. Rank 0 first stays until every rank has left its last wait
    (`_leave_together`). Under gloo the ranks then meet in a bounded barrier, so that no rank closes its connections
    while another still finishes its last collective (seen once as a rank aborting at exit even so); a rank that
    does not arrive within a minute is not waited for."""
    liveness.stop()
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        _leave_together()
    if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        except RuntimeError:  # a rank that failed or left: tear down without it
            pass
    dist.destroy_process_group()


def _leave_together(patience_seconds: float = 60.0, key: str = "fewstep/left") -> None:
    """Each rank counts itself out through the store; rank 0 returns once all have (or after `patience_seconds`).

    Under srun (slurm/common.sh) and the deepspeed launcher the rendezvous store lives in rank 0's process. The last
    rank to reach the final `wait_for_all` returns at once; if that is rank 0 and it exits, a rank still between two
    polls of that wait finds the store gone and fails a run that finished well (exit 1, a FAILED Slurm job)."""
    try:
        store = _store()
        left = store.add(key, 1)
        deadline = time.monotonic() + patience_seconds
        while rank() == 0 and left < world_size() and time.monotonic() < deadline:
            time.sleep(0.05)
            left = store.add(key, 0)
    except dist.DistError:  # the store's host is gone already: nothing to keep alive
        pass


FAILURE_PATIENCE_S = 15.0


def leave_after_failure() -> None:
    """Before a failed rank leaves (launcher/train.py's os._exit): every rank counts itself out, and rank 0, whose
    process may host the rendezvous store, waits until all have, so that no rank's last store call (announcing or
    reading the failure, a heartbeat) finds the store gone: c10d prints its "connection reset" dump, C++ frames and
    all, even for an error that is caught. A rank stuck in a collective or already killed (srun --kill-on-bad-exit)
    is waited for at most FAILURE_PATIENCE_S. (A fixed 2 s pause lost a rank that met the failure later.)

    Bounded on every rank, whatever the store does (a host that is gone without a reset would block a store call
    for the store's own timeout), and a Ctrl-C meanwhile just leaves."""
    if not (dist.is_initialized() and world_size() > 1):
        return
    liveness.stop()  # no heartbeat to a store that is going away

    def count_out() -> None:
        with contextlib.suppress(Exception):
            _leave_together(FAILURE_PATIENCE_S, key="fewstep/failed-left")
    counting = threading.Thread(target=count_out, name="fewstep-leave", daemon=True)
    counting.start()
    with contextlib.suppress(BaseException):
        counting.join(FAILURE_PATIENCE_S + 5)


# ---------------------------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------------------------

def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def comm_device() -> torch.device:
    """The device collectives of the default group take tensors on: CPU under gloo, this rank's GPU under NCCL."""
    if not dist.is_initialized():
        return torch.device("cpu")
    types = {d.type for d in getattr(dist.distributed_c10d._get_default_group(), "_device_types", [])}
    if "cpu" in types or not types:
        return torch.device("cpu")
    kind = sorted(types)[0]
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def reduce_step(means: dict[str, float], flags: dict[str, bool] | None = None) -> tuple[dict, dict]:
    """One all-reduce for a step: `means` averaged over ranks, `flags` true if true on any rank.

    Every rank must pass the same keys in the same order. Returns plain Python floats and bools.
    """
    flags = flags or {}
    values = [float(v) for v in means.values()] + [1.0 if f else 0.0 for f in flags.values()]
    if not values:
        return {}, {}
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())  # NCCL and gloo both reduce fp64
    n = world_size()
    if n > 1:
        dist.all_reduce(t)
    out = t.tolist()
    return ({k: v / n for k, v in zip(means, out)},
            {k: v > 0 for k, v in zip(flags, out[len(means):])})


def any_rank(flag: bool) -> bool:
    return reduce_step({}, {"flag": flag})[1]["flag"]


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled; small objects only)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def gather_object(obj, dst: int = 0) -> list | None:
    """Every rank's `obj` as a list on rank `dst` (None elsewhere): unlike `all_gather_object`, only one rank ever
    holds them all."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)  # torch puts the pickles on the group's device (the current GPU for NCCL)
    return out


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Waits that may be long: a barrier over the rendezvous store, not bound by the collective timeout
# ---------------------------------------------------------------------------------------------------------------

class RankFailed(RuntimeError):
    """Another rank failed inside `uneven_work`; this rank stops instead of waiting for it. `exit_status` is the one
    the failing rank exits with (2 when it was the user's mistake: every rank then ends as that rank does)."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


_ABORT_KEY = "fewstep/abort"
_wait_seq = [0]
HEARTBEAT_SECONDS = float(os.environ.get("FEWSTEP_WAIT_HEARTBEAT", "300"))


def _store():
    return dist.distributed_c10d._get_default_store()


def _store_lost(tag: str, error: Exception) -> RankFailed:
    return RankFailed(f"rank {rank()} lost the rendezvous store while waiting at '{tag}' ({type(error).__name__}: "
                      f"{error}): its host (rank 0, or the launcher's agent) has probably died; see its log")


def _announced_failure(store) -> RankFailed | None:
    """The failure a rank has announced (`announce_failure`), as the RankFailed to raise; None if there is none."""
    if not store.check([_ABORT_KEY]):
        return None
    status, _, message = store.get(_ABORT_KEY).decode(errors="replace").partition("|")
    return RankFailed(message, int(status))


def wait_for_all(tag: str) -> None:
    """A barrier that tolerates any wait: every rank counts itself in through the store and polls until all have.

    Every rank must call it the same number of times (like any barrier). A heartbeat line is printed (local rank 0 of
    each node) every `FEWSTEP_WAIT_HEARTBEAT` seconds of waiting; a failure reported by another rank raises, and so
    does a rank that has shown no sign of life for longer than the collective timeout (`liveness`).
    """
    n = world_size()
    if n == 1:
        return
    _wait_seq[0] += 1
    store, key = _store(), f"fewstep/wait/{_wait_seq[0]}"
    try:
        arrived = store.add(key, 1)
    except dist.DistError as e:
        raise _store_lost(tag, e) from None
    start = last = time.monotonic()
    pause = 0.005
    watch = liveness.Watch(store, n)
    while arrived < n:
        # Failure and liveness are read before the count: a wait that was complete by then returns (a rank that left
        # it and failed at once stops this one at its next wait); one that was not stops with the failure.
        try:
            failed = _announced_failure(store)
            silent = watch.silent_rank()
            arrived = store.add(key, 0)
        except dist.DistError as e:
            raise _store_lost(tag, e) from None
        if arrived >= n:
            break
        if failed is not None:
            raise failed
        if silent is not None:
            raise RankFailed(f"rank {silent[0]} has shown no sign of life for {silent[1]:.0f} s while rank {rank()} "
                             f"waited at '{tag}' ({arrived}/{n} ranks there): it was probably killed (out of host "
                             "memory?); see its log")
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
        now = time.monotonic()
        local = _launch_local_rank[0] if _launch_local_rank[0] is not None else int(os.environ.get("LOCAL_RANK", 0))
        if now - last >= HEARTBEAT_SECONDS and local == 0:
            print(f"fewstep: rank {rank()} waiting at '{tag}' for {now - start:.0f} s ({arrived}/{n} ranks there)",
                  flush=True)
            last = now


@contextlib.contextmanager
def uneven_work(tag: str):
    """Run a block whose duration differs between ranks (rank-0 writes, per-rank cache shares), then `wait_for_all`.

    If the block raises on one rank, the others stop with that rank's message (`RankFailed`) instead of hanging.
    No collective may run inside the block.
    """
    try:
        yield
    except BaseException as e:
        announce_failure(e, tag)
        raise
    wait_for_all(tag)


@contextlib.contextmanager
def deepspeed_barriers_wait(tag: str):
    """Within the block, DeepSpeed's whole-world `deepspeed.comm.barrier()` is `wait_for_all(tag)`: its
    `save_checkpoint` has ranks meet in barriers bound by the collective timeout while rank 0 alone writes the whole
    module state under ZeRO-1/2 (minutes for a large full fine-tune on a slow filesystem). Barriers of a subgroup
    stay collectives. Every rank must run the block (DeepSpeed calls its barriers on every rank alike)."""
    import deepspeed.comm as ds_comm

    collective = ds_comm.barrier

    def barrier(*args, **kwargs):
        if args or kwargs.get("group") is not None:
            return collective(*args, **kwargs)
        return wait_for_all(tag)

    ds_comm.barrier = barrier
    try:
        yield
    finally:
        ds_comm.barrier = collective


def first_failure() -> str | None:
    """The first failure a rank announced ('rank N failed[ during X]: Type: message'); None without one (or without
    a process group, or its store)."""
    if not dist.is_initialized() or world_size() == 1:
        return None
    try:
        failure = _announced_failure(_store())
    except Exception:  # the store's host has gone
        return None
    return None if failure is None else str(failure)


def announce_failure(error: BaseException, tag: str | None = None) -> bool:
    """Tell the ranks waiting in `wait_for_all` that this rank failed, so that they stop with its message
    (`RankFailed`) instead of waiting for ever: launcher/train.py calls it for any failure, wherever it happened (a
    bare `srun` without --kill-on-bad-exit leaves the other tasks running). The first failure's message is kept.
    Returns whether that is this rank's (False without a process group); never raises."""
    if isinstance(error, RankFailed) or not dist.is_initialized() or world_size() == 1:
        return False
    where = f" during {tag}" if tag else ""
    try:  # set only if unset, atomically (ranks that fail together: the first wins); returns what is set
        kept = _store().compare_set(_ABORT_KEY, "", f"{exit_status(error)}|rank {rank()} failed{where}: "
                                                    f"{type(error).__name__}: {error}")
        return kept.decode(errors="replace").partition("|")[2].startswith(f"rank {rank()} failed")
    except Exception:
        return False
