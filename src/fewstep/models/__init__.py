"""Model-family adapters (FLUX.1, SD3/3.5, Qwen-Image), any-step embeddings and tiny test pipelines.

    adapter = get_adapter("flux")
    comps = adapter.load("tiny:flux")            # or a local diffusers folder / hub id
    cond = adapter.encode_prompts(comps, ["a red cube"])
    v = adapter.forward(comps.denoiser, x, sigma, cond)

Adding a family = adding one module here whose adapter class is decorated with `@register_adapter`; every module
in this package is imported below, so the registry fills itself.
"""
import difflib as _difflib
import importlib as _importlib
import pkgutil as _pkgutil

from fewstep.models.base import (  # noqa: F401  (re-exported API)
    _REGISTRY,
    FlowModelAdapter,
    ModelComponents,
    _canonical,
    register_adapter,
    unwrap,
)
from fewstep.models.anystep import (  # noqa: F401
    ANYSTEP_WEIGHTS_NAME,
    add_anystep_embeddings,
    anystep_state,
    anystep_state_dict,
    load_anystep,
    load_anystep_state_dict,
    save_anystep,
    set_anystep_state,
)

for _m in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_m.name}")

FAMILIES: tuple[str, ...] = tuple(sorted({cls.family for cls in _REGISTRY.values()}))


def get_adapter(family: str) -> FlowModelAdapter:
    """The adapter for a model family ('flux', 'sd3', 'qwenimage'; case, '-', '_' ignored, 'qwen' accepted)."""
    cls = _REGISTRY.get(_canonical(family))
    if cls is None:
        close = _difflib.get_close_matches(str(family).lower(), list(_REGISTRY), n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model family {family!r}{hint}; known families: {', '.join(FAMILIES)}")
    return cls()
