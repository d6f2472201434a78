"""Whether the other ranks are still alive, for waits that have no deadline (`distributed.wait_for_all`).

A rank that dies without a word (SIGKILL from the out-of-memory killer, a lost node) cannot announce its failure. A
launcher that ends the job on the first failed task (torchrun, the deepspeed launcher, `srun --kill-on-bad-exit`, as
slurm/common.sh uses) stops the others; a bare `srun` does not, and the others would wait for ever. So every rank
counts a heartbeat in the rendezvous store from a daemon thread, and a waiting rank that sees some rank's count stand
still for longer than the collective timeout (`distributed_timeout_seconds`, the bound every collective has anyway;
at least MIN_SECONDS, so a heartbeat thread briefly starved on a loaded machine is not taken for a death) gives up,
naming that rank. Counts, not clocks: nodes' clocks need not agree, each waiter times with its own.
"""
from __future__ import annotations

import os
import threading
import time

MIN_SECONDS = float(os.environ.get("FEWSTEP_LIVENESS_MIN_SECONDS", "60"))  # tests lower it

_KEY = "fewstep/alive/{}"
_beat: dict = {"stop": None, "stale_after": None}


def start(store, rank: int, stale_after: float) -> None:
    """Count this rank's heartbeat in `store` every min(5 s, stale_after / 4) until `stop()`; idempotent."""
    if _beat["stop"] is not None:
        return
    interval = min(5.0, stale_after / 4)
    stop = threading.Event()
    store.add(_KEY.format(rank), 1)

    def beat() -> None:
        while not stop.wait(interval):
            try:
                store.add(_KEY.format(rank), 1)  # TCPStore calls release the GIL and are thread-safe
            except Exception:  # the store is gone (its host ended): no one is left to tell
                return

    threading.Thread(target=beat, name="fewstep-heartbeat", daemon=True).start()
    _beat.update(stop=stop, stale_after=float(stale_after))


def stop() -> None:
    if _beat["stop"] is not None:
        _beat["stop"].set()
    _beat.update(stop=None, stale_after=None)


class Watch:
    """Heartbeat counts of every rank seen during one wait, and since when each has stood still (this rank's clock).

    `silent_rank()` reads all counts in one store call at most every `stale_after / 4` seconds (30 s at most) and
    returns a rank whose count has not moved for longer than `stale_after`, else None. Inactive (always None) where no
    heartbeat was started in this process."""

    def __init__(self, store, world: int):
        self.store, self.keys = store, [_KEY.format(r) for r in range(world)]
        self.stale_after = _beat["stale_after"]
        self.counts: list | None = None  # at the last read
        self.since: list[float] = []  # per rank: when its count last moved (set at the first read)
        self.next_read = 0.0

    def silent_rank(self) -> tuple[int, float] | None:
        """(rank, seconds without a heartbeat) of a rank presumed dead, or None."""
        now = time.monotonic()
        if self.stale_after is None or now < self.next_read:
            return None
        self.next_read = now + min(30.0, self.stale_after / 4)
        counts = self.store.multi_get(self.keys)  # waits for a rank that has not started beating yet
        if self.counts is not None:
            for r, (old, new) in enumerate(zip(self.counts, counts)):
                if new != old:
                    self.since[r] = now
                elif now - self.since[r] > self.stale_after:
                    return r, now - self.since[r]
        else:
            self.since = [now] * len(counts)
        self.counts = counts
        return None
