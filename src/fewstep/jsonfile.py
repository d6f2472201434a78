"""Reading a user's JSON file with an error that names it (config files, data backends)."""
import json
import os


def load_json(path: str, error: type[Exception], what: str):
    """Parse `path`; a missing file or invalid JSON raises `error` naming `what` and the file."""
    if not os.path.isfile(path):
        raise error(f"{what} not found: {path}")
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise error(f"{path}: not valid JSON ({e})") from None
