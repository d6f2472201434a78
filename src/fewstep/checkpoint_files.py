"""The files of a checkpoint: who writes each (per-rank files are rank r's, all others rank 0's), the manifest a
complete one lists in `trainer.json`, what an incomplete one lacks, and the fsyncs that make a commit durable on a
shared filesystem (see `fewstep.checkpoint`)."""
from __future__ import annotations

import json
import os
import re


# DeepSpeed's per-rank files ([bf16_]zero_pp_rank_<r>_mp_rank_00_{optim,model}_states.pt) and our rank<r>.pt
_PER_RANK = re.compile(r"(?<=zero_pp_rank_)(\d+)(?=_)|(?<=^rank)(\d+)(?=\.pt$)")


def owner(name: str) -> int:
    """The rank that writes a checkpoint file: per-rank files are rank r's, all others (DeepSpeed's module states under
    ZeRO-0/1/2, its recovery scripts, trainer.json) rank 0's."""
    m = _PER_RANK.search(name)
    return int(m.group()) if m else 0


def for_rank(name: str, r: int) -> str:
    """A per-rank file's name as rank r writes it."""
    return _PER_RANK.sub(str(r), name, count=1)


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # directories too: fsync on a directory persists its entries
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """fsync every file under `directory`, then every directory of the tree, deepest first."""
    fsync_own_files(directory, None)


def fsync_own_files(directory: str, rank: int | None) -> None:
    """fsync the files under `directory` that this rank wrote, then every directory of the tree, deepest first (each
    rank added entries to them; a rank's fsync covers at least its own)."""
    for here, _, files in os.walk(directory, topdown=False):
        for name in files:
            if rank is None or owner(name) == rank:
                fsync(os.path.join(here, name))
        fsync(here)


def manifest(directory: str, world_size: int) -> list[str]:
    """Relative paths of every file a complete checkpoint holds, from rank 0's files in `directory` (written, its
    others' possibly not yet): each per-rank file repeated for every rank, plus trainer.json."""
    files = ["trainer.json"]
    for here, _, names in os.walk(directory):
        rel = os.path.relpath(here, directory)
        for name in names:
            if owner(name) != 0:
                continue
            per_rank = _PER_RANK.search(name) is not None
            for r in range(world_size) if per_rank else [0]:
                files.append(os.path.normpath(os.path.join(rel, for_rank(name, r) if per_rank else name)))
    return sorted(set(files))


def missing_files(path: str) -> list[str]:
    """The files (relative paths) a complete checkpoint at `path` holds but this one lacks, or holds empty (a file
    truncated after the save: no checkpoint file is empty); [] if complete."""
    try:
        with open(os.path.join(path, "trainer.json")) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        return ["trainer.json"]
    except (OSError, ValueError):
        return ["trainer.json (unreadable)"]
    expected = meta["files"] if "files" in meta else inferred_files(path)
    return [f if not os.path.isfile(os.path.join(path, f)) else f"{f} (empty)" for f in expected
            if not os.path.isfile(os.path.join(path, f)) or os.path.getsize(os.path.join(path, f)) == 0]


def inferred_files(path: str) -> list[str]:
    """For checkpoints written before trainer.json listed its files: every per-rank file present, repeated for every
    rank up to the highest one seen (a missing last rank goes unnoticed)."""
    per_rank = ["rank0.pt"]
    for here, _, names in os.walk(path):
        rel = os.path.relpath(here, path)
        per_rank += [os.path.normpath(os.path.join(rel, n)) for n in names if _PER_RANK.search(n)]
    world = 1 + max(owner(os.path.basename(f)) for f in per_rank)
    return sorted({os.path.join(os.path.dirname(f), for_rank(os.path.basename(f), r))
                   for f in per_rank for r in range(world)})


def listing(names: list[str], shown: int) -> str:
    """'a, b, c and 5 more': a bounded line even when a save of hundreds of ranks died half way."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
