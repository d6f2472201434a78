"""Paths users write: `~` and `$VAR` / `${VAR}` expanded, and what could not be expanded named instead of becoming
a folder literally called `$SLURM_TMPDIR` under the working directory (`os.path.expandvars` leaves an unset
variable, and forms such as `${VAR:-default}`, as they are)."""
from __future__ import annotations

import contextlib
import os
import re
import socket

_LEFTOVER = re.compile(r"\$\{[^}]*\}?|\$[A-Za-z_][A-Za-z0-9_]*")


def expand(value: str) -> str:
    """`value` with `~` and the set environment variables expanded."""
    return os.path.expanduser(os.path.expandvars(value))


def unexpanded(expanded: str) -> str | None:
    """Why `expanded` (an `expand` result) still holds a `$`: None if it does not."""
    left = list(dict.fromkeys(_LEFTOVER.findall(expanded)))
    if not left:
        return None
    names = [x.lstrip("${").rstrip("}") for x in left]
    if all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names):
        return f"environment variable {', '.join(names)} is not set"
    return f"{', '.join(left)} is not expanded (only $VAR and ${{VAR}} are, for variables that are set)"


def temporary_beside(path: str) -> str:
    """A temporary name beside `path` for an atomic write (write it, then rename it over `path`): this process's on
    this host, so writers on other nodes sharing the folder (a cache filled by two jobs) never write the same one."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically: into a temporary file of this process beside it, flushed to disk, then
    renamed over `path`, so a reader sees the whole new file or the previous one; a failed write (a full disk) leaves
    nothing behind."""
    tmp = temporary_beside(path)
    with removed_on_failure(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def removed_on_failure(tmp: str):
    """Remove the temporary file `tmp` if the block fails (a full disk, an interrupt): its partial contents would
    hold on to the space, or be found later."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def publish(staging: str, dest: str) -> list[str]:
    """Move every file of the folder `staging` into `dest` (same filesystem), each made durable first and swapped in
    atomically (a reader sees the old file or the new one, never a partial one), then `dest`'s entries made durable
    and `staging` removed. Returns the published paths. An export is written this way: a kill in the middle leaves
    whole files, and the marker written after them (`fewstep_run.json`) never names weights still in a page cache."""
    from fewstep.checkpoint_files import fsync

    published = []
    for name in sorted(os.listdir(staging)):
        src = os.path.join(staging, name)
        fsync(src)
        os.replace(src, os.path.join(dest, name))
        published.append(os.path.join(dest, name))
    fsync(dest)
    os.rmdir(staging)
    return published
