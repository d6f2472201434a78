"""SimpleTuner's placeholders in a data config: `{model_family}`, `{output_dir}`, `{id}` and `{env:NAME}` in any
string of an entry (its cache folders, mostly: `cache/vae/{model_family}/{id}`), filled as SimpleTuner's data
backend factory fills them (`fill_variables_in_config_paths`) before anything reads the entry."""
from __future__ import annotations

import os
import re
from typing import Any

from fewstep.data.errors import DataError


def placeholders(cfg) -> dict:
    """The values of SimpleTuner's `{model_family}` and `{output_dir}` in a data config (a fewstep Config's)."""
    return {"model_family": cfg.model_family, "output_dir": cfg.output_dir}


_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def fill_placeholders(value: Any, variables: dict, where: str) -> Any:
    """`value` (an entry, and every string in it) with SimpleTuner's placeholders filled, as its data backend
    factory does: `{model_family}`, `{output_dir}`, `{id}` (the entry's) and `{env:NAME}`; any other `{...}` is
    left as written. An unset `{env:NAME}` is refused (SimpleTuner makes it "", a path under the wrong folder)."""
    if isinstance(value, dict):
        return {k: fill_placeholders(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, variables, where) for v in value]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        token = match.group(1)
        if token.startswith("env:"):
            if token[4:] not in os.environ:
                raise DataError(f"{where}: {match.group(0)} names an environment variable that is not set")
            return os.environ[token[4:]]
        return str(variables[token]) if variables.get(token) is not None else match.group(0)
    return _PLACEHOLDER.sub(fill, value)
