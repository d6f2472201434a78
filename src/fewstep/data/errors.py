"""The data layer's user error (a `UserError`: `launcher/train.py` prints it as one `fewstep: ...` line)."""
from fewstep.errors import UserError


class DataError(UserError, ValueError):
    """A problem with the training data or its multidatabackend.json, naming the file (and entry and key)."""
