"""The data layer's user error (a `UserError`: `launcher/train.py` prints it as one `fewstep: ...` line)."""
import os

from fewstep.errors import UserError


class DataError(UserError, ValueError):
    """A problem with the training data or its multidatabackend.json, naming the file (and entry and key)."""


def missing_file(what: str, path: str) -> DataError:
    """The error for a listed file that cannot be opened because it is not there: mostly a symbolic link whose target
    was moved or deleted (a folder listing shows the link; only opening it fails)."""
    if os.path.islink(path):
        return DataError(f"{what} {path} is a broken symbolic link (its target {os.readlink(path)} does not exist): "
                         "restore the target or remove the link")
    return DataError(f"{what} {path} does not exist (was it removed while fewstep read the folder?)")
