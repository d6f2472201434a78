"""User-facing errors: one base class, so `launcher/train.py` can end any user mistake in one `fewstep: ...` line.

A `UserError` is something the user can fix (a config key, a data file, a path, a model source, a busy run
directory, a resume that does not fit, a run that diverged); anything else is a bug and keeps its traceback.
Set FEWSTEP_DEBUG=1 to see the traceback of a user error too.
"""


class UserError(Exception):
    """A problem the user can fix; its message says what and how."""


class ModelSourceError(UserError, FileNotFoundError):
    """The model to load is not where the config says (missing folder, offline hub id, wrong family)."""


class RunDirBusy(UserError):
    """Another run holds the output directory."""


class NonFiniteStop(UserError):
    """Training stopped because its loss or gradients stayed non-finite (nan_policy)."""


class ModelFamilyError(UserError, ValueError):
    """The model source names another family than `model_family` (e.g. 'tiny:sd3' with model_family flux)."""
