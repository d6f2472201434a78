"""Which ranks see the same directory: all of them on a shared filesystem, one node's ranks on a node-local one.

The cache fill splits its work among the ranks that share a cache directory, the hub download is made once per
shared Hugging Face cache, and the run directory must be shared by all ranks; each asks `sharing_group` (collective).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass

from fewstep.engine.distributed import all_gather_object, broadcast_object, rank, wait_for_all, world_size
from fewstep.engine.launch import LaunchError


@dataclass
class SharingGroup:
    """The ranks that see the same directory (all ranks on a shared filesystem, one node's on a node-local one)."""
    members: list[int]
    index: int  # this rank's position in `members`

    @property
    def size(self) -> int:
        return len(self.members)


def sharing_group(directory: str, patience_seconds: float = 10.0) -> SharingGroup:
    """Find the ranks that see `directory` as this rank does (collective).

    Each rank drops a marker file under `directory/.fewstep-ranks/<token>/`, then lists which markers it can see.
    Views must agree (if rank a sees b, b sees a and both see the same set); on a shared filesystem with attribute
    caching the listing is retried for up to `patience_seconds` until they do.
    """
    me, n = rank(), world_size()
    if n == 1:
        return SharingGroup([0], 0)
    token = broadcast_object(uuid.uuid4().hex if me == 0 else None)
    marks = os.path.join(directory, ".fewstep-ranks", token)
    os.makedirs(marks, exist_ok=True)
    with open(os.path.join(marks, f"rank{me}"), "w") as fh:
        fh.write(socket.gethostname())
    wait_for_all("sharing check")
    deadline = time.monotonic() + patience_seconds
    while True:
        seen = sorted(int(f[4:]) for f in os.listdir(marks) if f.startswith("rank") and f[4:].isdigit())
        # every rank decides from the same gathered values: ranks leave the wait above at different times, and one
        # rank stopping on its own clock while another loops into the next gather would hang that one
        gathered = all_gather_object((seen, time.monotonic() > deadline))
        views = [v for v, _ in gathered]
        consistent = all(m in views[m] and all(views[k] == views[m] for k in views[m]) for m in range(n))
        if consistent or any(expired for _, expired in gathered):
            break
        time.sleep(0.5)
    wait_for_all("sharing check done")
    if seen and seen[0] == me:
        import shutil
        shutil.rmtree(marks, ignore_errors=True)
        with contextlib.suppress(OSError):  # the parent too, unless another check is using it
            os.rmdir(os.path.dirname(marks))
    if not consistent:
        raise LaunchError(f"ranks disagree about which of them share '{directory}' (views {views}); is the "
                          "filesystem caching directory listings? Use a shared directory or a node-local one")
    return SharingGroup(seen, seen.index(me))
