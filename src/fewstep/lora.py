"""Which weights train (LoRA via peft, or everything), and exporting them in formats stock diffusers loads."""
from __future__ import annotations

import json
import os
import shutil

from torch import nn

from fewstep import faults
from fewstep.config import ConfigError
from fewstep.engine import distributed
from fewstep.models import anystep


def prepare_trainable(cfg, adapter, transformer: nn.Module, *, anystep_embeddings: bool) -> list[nn.Parameter]:
    """Add LoRA adapters (model_type lora) or unfreeze everything (full); returns the trainable parameters.

    TwinFlow's target-time and sign embeddings are trainable in both modes (frozen, as in SimpleTuner's port, they
    would make F(x, -t) == F(x, t) and L_rectify identically zero).
    """
    if anystep_embeddings:
        adapter.add_anystep(transformer)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.model_type == "full":
        transformer.requires_grad_(True)
        return [p for p in transformer.parameters()]
    from peft import LoraConfig

    transformer.requires_grad_(False)
    targets = cfg.lora_targets or list(adapter.default_lora_targets)
    transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules=targets, init_lora_weights=True))
    if anystep_embeddings:
        transformer.anystep_embed.requires_grad_(True)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"no LoRA target matched {targets} in {type(transformer).__name__}")
    return trainable


def _gathered(params):
    """Context that materialises ZeRO-3 partitioned parameters (no-op otherwise)."""
    import contextlib

    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def export_lora(adapter, transformer: nn.Module, out_dir: str, is_main: bool) -> None:
    """Write `out_dir/pytorch_lora_weights.safetensors` (+ any-step embeddings) for `load_lora_weights`.

    Every rank must call it (a collective gather under ZeRO-3); the others wait for rank 0's write without a
    collective timeout."""
    from peft.utils import get_peft_model_state_dict

    lora_params = [p for n, p in transformer.named_parameters() if "lora_" in n or "anystep_embed" in n]
    with _gathered(lora_params), distributed.uneven_work("export"):
        if is_main:
            os.makedirs(out_dir, exist_ok=True)
            sd = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(transformer).items()}
            adapter.save_lora(out_dir, sd)
            if hasattr(transformer, "anystep_embed"):
                anystep.save_anystep(transformer, out_dir)
            faults.delay("export")


def export_full(transformer: nn.Module, out_dir: str, is_main: bool) -> None:
    """Write the fine-tuned transformer in diffusers `save_pretrained` layout (`from_pretrained` loads it).

    Any-step embeddings are stored beside it (`anystep_embeddings.safetensors`), not inside, so the folder stays a
    stock diffusers model. Collective under ZeRO-3."""
    from safetensors.torch import save_file

    with _gathered(list(transformer.parameters())), distributed.uneven_work("export"):
        if is_main:
            tmp = out_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            transformer.save_config(tmp)
            sd = {k: v.detach().cpu().contiguous().clone() for k, v in transformer.state_dict().items()
                  if not k.startswith("anystep_embed.")}
            save_file(sd, os.path.join(tmp, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
            if hasattr(transformer, "anystep_embed"):
                anystep.save_anystep(transformer, tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
            faults.delay("export")


RUN_INFO = "fewstep_run.json"


def write_run_info(out_dir: str, cfg, extra: dict | None = None) -> None:
    """The config and what was trained, beside the weights (written atomically: it marks a finished export)."""
    tmp = os.path.join(out_dir, RUN_INFO + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"config": cfg.to_dict(), **(extra or {})}, fh, indent=1, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(out_dir, RUN_INFO))


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
