"""Reading a user's JSON file with an error that names it (config files, data backends), and writing one of
fewstep's atomically."""
import json
import os

from fewstep.paths import write_atomic


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (json.load keeps the last one without a word)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def load_json(path: str, error: type[Exception], what: str):
    """Parse `path`; a missing, unreadable (permissions, I/O) or directory path, invalid JSON (text that is not UTF-8
    included) or an object with a key given twice raises `error` naming `what` and the file."""
    if os.path.isdir(path):
        raise error(f"{what} is a directory, expected a JSON file: {path}")
    if not os.path.isfile(path):
        raise error(f"{what} not found: {path}")
    try:
        with open(path) as fh:
            return json.load(fh, object_pairs_hook=_object)
    except _DuplicateKey as e:
        raise error(f"{path}: '{e.args[0]}' is given twice in one JSON object; keep one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{what} cannot be read: {path} ({e.strerror or e})") from None


def parse_json_text(text: str, error: type[Exception], what: str):
    """JSON given as text (an option's inline value), checked as `load_json` checks a file."""
    try:
        return json.loads(text, object_pairs_hook=_object)
    except _DuplicateKey as e:
        raise error(f"{what}: '{e.args[0]}' is given twice in one JSON object; keep one") from None
    except json.JSONDecodeError as e:
        raise error(f"{what}: the JSON text given is not valid JSON ({e})") from None


def save_json(path: str, obj, **dump_options) -> None:
    """Write `obj` as JSON to `path` atomically (`paths.write_atomic`)."""
    write_atomic(path, json.dumps(obj, **dump_options))
