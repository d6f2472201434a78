"""model_family -> adapter class. An adapter module registers its class with `@register_adapter`; importing
`fewstep.models` imports every module of the package, so the registry fills itself."""
from __future__ import annotations

import difflib
import re

_REGISTRY: dict[str, type] = {}  # family name and aliases -> adapter class


def register_adapter(cls: type) -> type:
    """Class decorator: register an adapter under its `family` name (and its `aliases`)."""
    if not getattr(cls, "family", None):
        raise TypeError(f"{cls.__name__} must set a non-empty `family` class attribute")
    for name in (cls.family, *cls.aliases):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model family {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
    return cls


def adapter_classes() -> list[type]:
    """Every registered adapter class, once."""
    return list(dict.fromkeys(_REGISTRY.values()))


def families() -> tuple[str, ...]:
    return tuple(sorted(cls.family for cls in adapter_classes()))


def canonical_family(name: str) -> str:
    """Registry key for a user-written family name ('Qwen-Image' -> 'qwenimage', an alias -> its family)."""
    key = re.sub(r"[-_ .]", "", str(name).lower())
    cls = _REGISTRY.get(key)
    return cls.family if cls is not None else key


def get_adapter(family: str):
    """The adapter for a model family ('flux', 'sd3', 'qwenimage', 'sdxl'; case, '-', '_' ignored; aliases such as
    'qwen' and 'qwen_image' accepted)."""
    cls = _REGISTRY.get(canonical_family(family))
    if cls is None:
        close = difflib.get_close_matches(str(family).lower(), list(_REGISTRY), n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model family {family!r}{hint}; known families: {', '.join(families())}")
    return cls()
