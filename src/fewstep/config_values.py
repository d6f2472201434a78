"""From JSON and command-line text to typed option values: key spellings, `--key value` overrides, each value's type,
choices and range. The options themselves (types, defaults, help) are declared once, in `fewstep.config.Config`,
whose dataclass fields these functions are given."""
from __future__ import annotations

import dataclasses
import decimal
import difflib
import json
import math
from typing import Any

from fewstep.errors import ConfigError


def normalize_key(key: str) -> str:
    """'--flow-custom-timesteps' / '--flow_custom_timesteps' / 'flow_custom_timesteps' -> 'flow_custom_timesteps'."""
    return key.lstrip("-").replace("-", "_")


def closest_keys(unknown: list[str], source: dict[str, str], fields: dict[str, dataclasses.Field]) -> str:
    """The error for keys that are not options: every one of them, where it was given, and the closest option."""
    def closest(key: str) -> str:
        match = difflib.get_close_matches(key, fields.keys(), n=1, cutoff=0.5)
        return f"did you mean '{match[0]}'?" if match else ""

    if len(unknown) == 1:
        key, hint = unknown[0], closest(unknown[0])
        return f"unknown config key '{key}'{source.get(key, '')}" + (f"; {hint}" if hint else "")
    return f"{len(unknown)} unknown config keys: " + "; ".join(
        f"'{k}'{source.get(k, '')}" + (f" ({closest(k)})" if closest(k) else "") for k in unknown)


def parse_overrides(argv: list[str], fields: dict[str, dataclasses.Field]) -> dict[str, Any]:
    """`--key value`, `--key=value` and bare `--flag` (true) pairs from a command line; a bare flag naming one of
    `fields` that is not a boolean is an error."""
    out, i = {}, 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected command-line argument {tok!r}: overrides look like --key value")
        if "=" in tok:
            k, v = tok.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            k, v = tok, argv[i + 1]
            i += 2
        else:
            k, v = tok, "true"
            i += 1
            f = fields.get(normalize_key(k))
            if f is not None and "bool" not in f.type:  # a bare flag is true: only booleans are flags
                raise ConfigError(f"{tok} needs a value ({tok} VALUE; {f.metadata['help']})")
        out[normalize_key(k)] = v
    return out


def coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert a JSON or command-line value to the declared type of option `key` (field `f`), and check its choices
    and range."""
    meta = f.metadata
    typ = f.type.replace("Optional[", "").rstrip("]")
    if meta["choices"] is not None and isinstance(value, str):  # "None" for report_to's "none", "FP32" for "fp32"
        value = next((c for c in meta["choices"] if isinstance(c, str) and c.lower() == value.lower()), value)
    is_choice = meta["choices"] is not None and value in meta["choices"]  # e.g. report_to: "none"
    # "null" / "none" (the command line's only way to write null) is None for every option, the timestep lists
    # (typed Any) included, unless it is one of the option's choices
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and not is_choice):
        if f.default is None or meta["choices"] and None in meta["choices"]:
            return None
        raise ConfigError(f"'{key}' may not be null")
    try:
        value = as_type(typ, value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"'{key}' expects {typ}, got {value!r}") from None
    if meta["choices"] is not None and value not in meta["choices"]:
        valid = ", ".join("null" if c is None else str(c) for c in meta["choices"])
        hint = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"] if c is not None], n=1)
        raise ConfigError(f"'{key}' must be one of: {valid}; got {value!r}" + (f" (did you mean '{hint[0]}'?)"
                                                                                if hint else ""))
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        raise ConfigError(f"'{key}' must be {'>' if meta['lo_open'] else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"'{key}' must be <= {hi}, got {value}")
    return value


def as_type(typ: str, value: Any) -> Any:
    """`value` as a `typ` ("bool", "int", "float", "str", "list"; anything else as given); raises ValueError."""
    if typ == "bool":
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, (bool, int)) or value not in (0, 1):  # 2 is no answer to a yes/no question
            raise ValueError
        return bool(value)
    if typ == "int":
        if isinstance(value, str):  # "10.0" on the command line as 10.0 in a JSON file; "1e3" too; exactly
            try:
                exact = decimal.Decimal(value.strip())
            except decimal.InvalidOperation:
                raise ValueError from None
            if not exact.is_finite() or exact.adjusted() > 40 or exact != exact.to_integral_value():
                raise ValueError  # (no option takes 41 digits; "1e100000000" would build that integer)
            return int(exact)
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if typ == "float":
        if isinstance(value, bool):
            raise ValueError
        value = float(value)
        if not math.isfinite(value):
            raise ValueError
        return value
    if typ == "str":
        if not isinstance(value, str):
            raise ValueError
        return value
    if typ == "list":
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return list(value)
    return value
