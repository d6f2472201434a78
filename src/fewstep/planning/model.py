"""The denoiser to plan for, on the meta device: its config, its exact parameter counts, LoRA counted analytically.

The denoiser is a diffusers transformer (FLUX, SD3, Qwen-Image) or UNet (SDXL). Shipped architectures live in
`configs/models/*.json` (a diffusers model config with `_class_name`); a local diffusers folder's
`transformer/config.json` or `unet/config.json` works the same. Building on the meta device allocates nothing, so the
20B Qwen-Image transformer takes a fraction of a second.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fewstep.jsonfile import load_json

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "models"
# shipped architecture per model family (used when the pretrained path is a hub id or `tiny:<family>`, not a folder)
FAMILY_MODEL_CONFIGS = {"qwenimage": "qwen_image.json", "flux": "flux_dev.json", "sd3": "sd35_large.json",
                        "sdxl": "sdxl.json"}
FAMILY_NAMES = {"qwenimage": "Qwen-Image", "flux": "FLUX.1", "sd3": "SD3.5 Large", "sdxl": "SDXL"}  # for messages
DENOISER_SUBFOLDERS = ("transformer", "unet")  # where a diffusers pipeline folder keeps its denoiser


def load_model_config(path: str | os.PathLike) -> dict:
    """Read a diffusers denoiser (transformer or UNet) config JSON; it must name its class in `_class_name`. A missing
    file or invalid JSON raises ValueError naming the file."""
    cfg = load_json(path, ValueError, "model config")
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise ValueError(f"{path}: expected a diffusers denoiser (transformer or UNet) config with '_class_name', "
                         f"like {MODEL_CONFIG_DIR / 'flux_dev.json'}")
    return cfg


def resolve_model_config(family: str, name_or_path: str | None, model_config: str | None = None) -> dict:
    """The denoiser config to plan for: an explicit JSON, a local diffusers folder (its `transformer/` or `unet/`
    config, or a config.json at its top), or the family's shipped one (`model_config_source` says which)."""
    return model_config_source(family, name_or_path, model_config)[0]


def model_config_source(family: str, name_or_path: str | None, model_config: str | None = None) -> tuple[dict, str]:
    """`resolve_model_config`'s config and one line saying where it came from (the plan prints it).

    A hub id and fewstep's `tiny:<family>` test model both plan the family's shipped (real) architecture: the planner
    answers whether a config fits on GPUs, its token counts are the real pipelines' (VAE /8, the pipeline's text
    length), and a tiny model is a CPU stand-in for its family. The line says so; `model_config` plans another."""
    if model_config:
        return load_model_config(model_config), f"architecture: model_config {model_config}"
    if name_or_path and os.path.isdir(name_or_path):
        for sub in [f"{d}/config.json" for d in DENOISER_SUBFOLDERS] + ["config.json"]:
            if os.path.isfile(os.path.join(name_or_path, sub)):
                path = os.path.join(name_or_path, sub)
                return load_model_config(path), f"architecture: {path} (the local diffusers folder)"
        raise ValueError(f"pretrained_model_name_or_path {name_or_path!r} is a folder without transformer/config.json "
                         "or unet/config.json (the denoiser: a transformer or a UNet)")
    from fewstep.models import get_adapter

    key = get_adapter(family).family
    if key not in FAMILY_MODEL_CONFIGS:
        raise ValueError(f"model_family {family!r} has no shipped architecture (known: "
                         f"{', '.join(FAMILY_MODEL_CONFIGS)}); pass --model_config <diffusers config.json>")
    path = MODEL_CONFIG_DIR / FAMILY_MODEL_CONFIGS[key]
    shown = path.relative_to(MODEL_CONFIG_DIR.parents[1]).as_posix()
    if str(name_or_path or "").startswith("tiny:"):
        line = (f"architecture: {name_or_path} is a test model; planning the real {FAMILY_NAMES[key]} architecture "
                f"({shown}) instead (--model_config plans another)")
    else:
        line = (f"architecture: {shown} (model_family {family}'s shipped {FAMILY_NAMES[key]}"
                + (f", for {name_or_path})" if name_or_path else ")"))
    return load_model_config(path), line


def build_meta_transformer(model_config: dict, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The diffusers denoiser (any diffusers model class: a transformer or a UNet) named by `_class_name`, on the meta
    device (exact shapes, no memory)."""
    import diffusers

    cls = getattr(diffusers, model_config["_class_name"], None)
    if cls is None:
        raise ValueError(f"_class_name {model_config['_class_name']!r} is not a diffusers class")
    kwargs = {k: v for k, v in model_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(kwargs)
    return cast(model, dtype)


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype) without diffusers' warning about modules to keep in float32 (nothing is loaded here)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return model.to(dtype)
    finally:
        logging.set_verbosity(level)


def anystep_dim(model: nn.Module) -> int:
    """Width D of TwinFlow's any-step embedding, as `fewstep.models.anystep` sizes it (1280 for SDXL's UNet)."""
    from fewstep.models.anystep import embedding_width

    return embedding_width(model)


def anystep_param_count(model: nn.Module) -> int:
    """Parameters of the any-step embedding: nn.Embedding(2, D) + Linear(256, D) + Linear(D, D)."""
    from fewstep.models.anystep import FREQ_DIM

    d = anystep_dim(model)
    return 2 * d + (FREQ_DIM + 1) * d + (d + 1) * d


@dataclass(frozen=True)
class AnyStep:
    """Attaches a family's any-step embedding to a (meta) denoiser: `AnyStep("sdxl")(model)` -> the embedding.

    Hashable by value, so activation traces are memoised across plans. The family adapter's own `add_anystep` is
    used; a denoiser it cannot hook (a model_config of another class than the family's) gets an unhooked
    `AnyStepEmbedding` of the same width (`anystep_dim`): its parameters are what the plan counts, and the one
    [batch, D] term the hook would add is negligible next to the activations.
    """

    family: str

    def __call__(self, model: nn.Module) -> nn.Module:
        from fewstep.models import get_adapter
        from fewstep.models.anystep import AnyStepEmbedding

        try:
            return get_adapter(self.family).add_anystep(model)
        except (TypeError, AttributeError):
            if hasattr(model, "anystep_embed"):
                raise
            model.anystep_embed = AnyStepEmbedding(anystep_dim(model), 1.0)
            return model.anystep_embed


def lora_param_count(model: nn.Module, targets, rank: int) -> int:
    """Parameters peft's LoRA adds: rank * (in + out) per targeted Linear. A module is targeted when its qualified
    name equals a target or ends with '.' + target (peft's rule for a list of names)."""
    return sum(lora_param_sizes(model, targets, rank))


def lora_param_sizes(model: nn.Module, targets, rank: int) -> list[int]:
    """Numel of each LoRA tensor peft adds, in module order: lora_A (rank * in), lora_B (out * rank) per target."""
    sizes, hit = [], set()
    for name, mod in model.named_modules():
        match = [t for t in targets if name == t or name.endswith("." + t)]
        if not match:
            continue
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"LoRA target {match[0]!r} matches {name} ({type(mod).__name__}), not a Linear")
        sizes += [rank * mod.in_features, mod.out_features * rank]
        hit.update(match)
    missing = set(targets) - hit
    if missing:
        raise ValueError(f"LoRA targets {sorted(missing)} match no module of {type(model).__name__}")
    return sizes


@dataclass
class ParamCounts:
    total: int  # every parameter the engine holds (base + LoRA + any-step embeddings)
    trainable: int
    buffer_bytes: int  # non-parameter buffers (SD3's positional table), replicated on every GPU
    persistent: int  # ZeRO-3: parameters at or below the persistence threshold, kept whole on every rank
    largest_module: int  # DeepSpeed's "largest layer": the most parameters one module holds directly
    largest_block: int = 0  # the largest group the full export gathers at once (fewstep.full_export.param_groups:
    #                         a transformer block; in a UNet a resnet or a transformer block)
    # numel of each trainable / frozen tensor, in the model's order (DeepSpeed's host buffers are per tensor, per
    # sub-group); empty: one tensor of `trainable` / `frozen` elements
    trainable_sizes: tuple[int, ...] = ()
    frozen_sizes: tuple[int, ...] = ()

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_params(model: nn.Module, *, lora: bool, targets=(), rank: int = 0, extra_trainable: tuple[int, ...] = (),
                 persistence_threshold: int = 0) -> ParamCounts:
    """Exact counts for full fine-tuning, or for LoRA (counted analytically: no peft needed) on a meta model.

    extra_trainable: numel of each parameter already in `model` that trains under LoRA too (TwinFlow's any-step
    embeddings).
    """
    sizes = [p.numel() for p in model.parameters()]
    trainable, frozen = tuple(sizes), []
    if lora:
        trainable, frozen = tuple(lora_param_sizes(model, targets, rank)) + tuple(extra_trainable), list(sizes)
        for s in extra_trainable:
            frozen.remove(s)
    persistent = sum(s for s in sizes if s <= persistence_threshold)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    from fewstep.full_export import param_groups

    block = max(sum(p.numel() for _, p in group) for group in param_groups(model))
    return ParamCounts(sum(frozen) + sum(trainable), sum(trainable), buffers, persistent, largest, block, trainable,
                       tuple(frozen))
