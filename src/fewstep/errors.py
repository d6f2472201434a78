"""User-facing errors: one base class, so `launcher/train.py` can end any user mistake in one `fewstep: ...` line.

A `UserError` is something the user can fix (a config key, a data file, a path, a model source, a busy run
directory, a resume that does not fit, a run that diverged); anything else is a bug and keeps its traceback.
Set FEWSTEP_DEBUG=1 to see the traceback of a user error too.
"""


class UserError(Exception):
    """A problem the user can fix; its message says what and how."""


class ConfigError(UserError, ValueError):
    """A config problem (an unknown key, a bad value, options that do not go together), reported before anything is
    built."""


class ModelSourceError(UserError, FileNotFoundError):
    """The model to load is not where the config says (missing folder, offline hub id, wrong family)."""


class RunDirBusy(UserError):
    """Another run holds the output directory."""


class NonFiniteStop(UserError):
    """Training stopped because its loss or gradients stayed non-finite (nan_policy)."""


class ModelFamilyError(UserError, ValueError):
    """The model source names another family than `model_family` (e.g. 'tiny:sd3' with model_family flux)."""


def exit_status(error: BaseException) -> int:
    """The launcher's exit status for an error it reports in one line: 2 for a mistake in the user's input, 1 for a
    run that failed on its way (a non-finite stop, or another rank's failure that was not such a mistake: an error
    carrying `exit_status`, as `RankFailed` does, keeps the failing rank's)."""
    if isinstance(error, NonFiniteStop):
        return 1
    if isinstance(error, UserError):
        return 2
    return getattr(error, "exit_status", 1)
