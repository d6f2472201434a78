"""Model-family adapters (FLUX.1, SD3/3.5, Qwen-Image; SDXL through diff2flow), any-step embeddings and tiny test
pipelines.

    adapter = get_adapter("flux")
    comps = adapter.load("tiny:flux")            # or a local diffusers folder / hub id
    cond = adapter.encode_prompts(comps, ["a red cube"])
    v = adapter.forward(comps.denoiser, x, sigma, cond)

Adding a family = adding one module here whose adapter class is decorated with `@register_adapter`
(`fewstep.models.registry`); every module in this package is imported below, so the registry fills itself. Its name
goes into `model_family`'s choices in `fewstep.config` too (which stays free of model imports). The planner
(`fewstep.planning.model`, `.activations`), `tiny:<family>` (`fewstep.models.tiny`) and the ComfyUI LoRA layout
(`fewstep.lora_formats`) refuse a family they have no entry for, by name.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from fewstep.models.base import FlowModelAdapter, ModelComponents, unwrap  # noqa: F401  (re-exported API)
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
from fewstep.models.registry import families as _families
from fewstep.models.registry import get_adapter, register_adapter  # noqa: F401

for _m in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_m.name}")

FAMILIES: tuple[str, ...] = _families()
