"""Reading a user's JSON file with an error that names it (config files, data backends), and writing one of
fewstep's atomically."""
import json
import os

from fewstep.paths import removed_on_failure, temporary_beside


def load_json(path: str, error: type[Exception], what: str):
    """Parse `path`; a missing file or invalid JSON raises `error` naming `what` and the file."""
    if not os.path.isfile(path):
        raise error(f"{what} not found: {path}")
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise error(f"{path}: not valid JSON ({e})") from None


def save_json(path: str, obj, **dump_options) -> None:
    """Write `obj` as JSON to `path` atomically: into a temporary file of this process beside it
    (`paths.temporary_beside`), flushed to disk, then renamed over `path`, so a reader sees the whole new file or the
    previous one; a failed write (a full disk) leaves nothing behind."""
    tmp = temporary_beside(path)
    with removed_on_failure(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, **dump_options)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
