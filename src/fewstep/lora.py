"""Which weights train (LoRA via peft, or everything), and LoRA exports for diffusers and ComfyUI (`lora_formats`)."""
from __future__ import annotations

import json
import os
import shutil

from torch import nn

from fewstep import faults, lora_formats
from fewstep.config import ConfigError
from fewstep.engine import distributed
from fewstep.jsonfile import save_json
from fewstep.models import anystep
from fewstep.models.attention import checkpoint_with_forward_kernels
from fewstep.paths import publish


def prepare_trainable(cfg, adapter, transformer: nn.Module, *, anystep_embeddings: bool) -> list[nn.Parameter]:
    """Add LoRA adapters (model_type lora) or unfreeze everything (full); returns the trainable parameters.

    TwinFlow's target-time and sign embeddings are trainable in both modes (frozen, as in SimpleTuner's port, they
    would make F(x, -t) == F(x, t) and L_rectify identically zero).
    """
    if anystep_embeddings and cfg.model_type == "full":
        adapter.add_anystep(transformer)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(checkpoint_with_forward_kernels)
    if cfg.model_type == "full":
        transformer.requires_grad_(True)
        return [p for p in transformer.parameters()]
    from peft import LoraConfig

    transformer.requires_grad_(False)
    targets = cfg.lora_targets or list(adapter.default_lora_targets)
    check_targets(transformer, targets)
    transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules=targets, init_lora_weights=_PEFT_INIT[cfg.lora_init_type]))
    if anystep_embeddings:  # after the adapter, so that no LoRA target wraps its layers: they train in full, and a
        adapter.add_anystep(transformer)  # wrapped one broke anystep_embeddings.safetensors (peft's key names)
        transformer.anystep_embed.requires_grad_(True)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"no LoRA target matched {targets} in {type(transformer).__name__}")
    if "comfyui" in getattr(cfg, "lora_export_formats", ()):  # refuse now what the export could not write later
        lora_formats.check_modules(adapter.family, _lora_scales(transformer), _layers_per_block(transformer))
    return trainable


_PEFT_INIT = {"default": True, "gaussian": "gaussian"}  # lora_init_type -> peft's init_lora_weights


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every LoRA target must name modules of the model as peft matches a list (the full name, or its dotted tail):
    a typo in one of several targets would otherwise adapt fewer layers without a word."""
    import difflib

    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        tails = sorted({".".join(n.split(".")[-k:]) for n in names for k in (1, 2)})
        hints = [f"'{t}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(t, tails, n=1)) else f"'{t}'"
                 for t in missing]
        raise ConfigError(f"lora_targets: no module of {type(model).__name__} is named {', '.join(hints)}")


def check_targets_before_load(cfg, source: str) -> None:
    """Given `lora_targets`, check them against the denoiser built on the meta device from the model source's own
    config (no weights, seconds): a typo ends the run before the data scan, the cache fill and the load, not after."""
    if cfg.model_type != "lora" or not cfg.lora_targets:
        return
    from fewstep.planning.model import build_meta_transformer, model_config_source

    try:
        config, _ = model_config_source(cfg.model_family, source)
        model = build_meta_transformer(config)
    except Exception:  # noqa: BLE001 - an architecture the planner cannot build: the check after the load stands
        return
    check_targets(model, cfg.lora_targets)


def _gathered(params):
    """Context that materialises ZeRO-3 partitioned parameters (no-op otherwise)."""
    import contextlib

    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _lora_scales(transformer: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """{module: the LoRA scale peft applies (lora_alpha / r, or / sqrt(r) with rslora)} for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[adapter_name]) for name, m in transformer.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.scaling}


def _layers_per_block(denoiser: nn.Module):
    """A UNet's `layers_per_block` (the sgm names of SDXL's kohya layout count it); None for a transformer."""
    return dict(getattr(denoiser, "config", None) or {}).get("layers_per_block")


def _out_features(transformer: nn.Module) -> dict[str, int]:
    """Output width of every Linear by its diffusers name (a peft-wrapped one under its own name)."""
    return {name.removesuffix(".base_layer"): m.out_features for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear)}


def export_lora(adapter, transformer: nn.Module, out_dir: str, is_main: bool,
                formats: tuple[str, ...] | list[str] = ("diffusers",)) -> None:
    """Write `out_dir/pytorch_lora_weights.safetensors` (+ any-step embeddings) for `load_lora_weights`, and with
    "comfyui" in `formats` the same LoRA in the ComfyUI/kohya layout beside it (`lora_formats`).

    Each module's LoRA scale (lora_alpha / r) is folded into its lora_B, so both files mean the same under every
    loader (a diffusers file carries no alpha: `load_lora_weights` assumes lora_alpha = r). Every rank must call it
    (a collective gather under ZeRO-3); the others wait for rank 0's write without a collective timeout."""
    from peft.utils import get_peft_model_state_dict

    lora_params = [p for n, p in transformer.named_parameters() if "lora_" in n or "anystep_embed" in n]
    with _gathered(lora_params), distributed.uneven_work("export"):
        if is_main:
            staging = os.path.join(out_dir, ".export.tmp")  # written whole, then each file swapped in (`publish`)
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted export's
            os.makedirs(staging)
            sd = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(transformer).items()}
            sd = lora_formats.fold_scaling(sd, _lora_scales(transformer))
            adapter.save_lora(staging, sd)
            if "comfyui" in formats:
                lora_formats.save_kohya(adapter.family, sd, os.path.join(staging, lora_formats.COMFYUI_WEIGHTS_NAME),
                                        _out_features(transformer), _layers_per_block(transformer))
            if hasattr(transformer, "anystep_embed"):
                anystep.save_anystep(transformer, staging)
            faults.work_at("export")
            publish(staging, out_dir)
            comfy = os.path.join(out_dir, lora_formats.COMFYUI_WEIGHTS_NAME)
            if "comfyui" not in formats and os.path.exists(comfy):  # an earlier export's, with other options
                os.remove(comfy)


RUN_INFO = "fewstep_run.json"


def write_run_info(out_dir: str, cfg, extra: dict | None = None) -> None:
    """The config and what was trained, beside the weights (written atomically: it marks a finished export)."""
    save_json(os.path.join(out_dir, RUN_INFO), {"config": cfg.to_dict(), **(extra or {})}, indent=1, default=str)


def remove_run_info(out_dir: str) -> None:
    try:
        os.remove(os.path.join(out_dir, RUN_INFO))
    except FileNotFoundError:
        pass


def run_info_matches(out_dir: str, phase: str, step: int) -> bool:
    try:
        with open(os.path.join(out_dir, RUN_INFO)) as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return False
    return info.get("phase") == phase and info.get("step") == step


def count_params(params) -> int:
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
