"""Validation: render the validation prompt with the weights being trained, at a fixed seed, as launcher/sample.py
would (the family's classifier-free guidance, Glance's chained Slow/Fast lists, TwinFlow's few-step scheduler), and
write it as a PNG and to TensorBoard.
What to render (guidance, prompts) is `fewstep.validation_settings`.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fewstep.data.cache import atomic_save
from fewstep.engine import distributed
from fewstep.errors import UserError
from fewstep.methods.flow_matching import schedule_shift
from fewstep.methods.glance import glance_schedule, listed_schedule
from fewstep.metrics import log_main
from fewstep.models.base import unwrap
from fewstep.paths import removed_on_failure, temporary_beside
from fewstep.sampling import euler_loop, flow_sigmas, grid, to_pil, twinflow_loop
from fewstep.step_context import StepContext, to_device, velocity_fn
from fewstep.steps import Phase
from fewstep.validation_settings import (validation_cfg_scale, validation_distilled_guidance, validation_prompts,
                                         validation_size)

HANDOFF = "glance-slow-handoff.safetensors"  # under <output_dir>/validation: where Slow's validation stopped


def validate(ctx: StepContext, phase: Phase, step: int, logger, vae, is_main: bool) -> None:
    """Render the validation prompt, then those of `user_prompt_library`, each from the same seed (every rank
    samples: ZeRO-3 forwards are collective); rank 0 decodes, writes a PNG and logs it to TensorBoard while the others
    wait without a collective timeout."""
    cfg, ds, engine = ctx.cfg, ctx.dataset, ctx.engine
    prompt, negative = validation_prompts(cfg, ds, ctx.adapter)
    uncond = to_device(ctx.adapter.collate_cond([ds.text[negative]]), ctx.device, ctx.dtype)
    for name, text in [("", prompt), *ds.validation_library]:
        cond = to_device(ctx.adapter.collate_cond([ds.text[text]]), ctx.device, ctx.dtype)
        engine.eval()
        latents, handoff = sample_latents(ctx, phase, cond, torch.Generator().manual_seed(cfg.validation_seed),
                                          uncond, name, text)
        engine.train()
        with distributed.uneven_work("validation"):
            if is_main:
                if handoff is not None:
                    _write_handoff(cfg, handoff, name, text)
                _write_validation(ctx, phase, step, logger, vae, latents, name)


@torch.no_grad()
def sample_latents(ctx: StepContext, phase: Phase, cond: dict, generator: torch.Generator,
                   uncond: Optional[dict] = None, name: str = "", prompt: Optional[str] = None
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validation sampling with the current weights (all ranks take part: ZeRO-3 forwards are collective). Returns
    the latents and, in Glance's Slow phase, the hand-off latents (where Slow stops and Fast starts): `name` (a
    user_prompt_library prompt's: its hand-off is its own) and `prompt` (its text) pick the Fast phase's."""
    cfg = ctx.cfg
    model = velocity_fn(ctx, validation_distilled_guidance(cfg, ctx.adapter))
    shape = (1, *ctx.dataset.validation_shape(validation_size(cfg.validation_resolution)))
    x = torch.randn(shape, generator=generator).to(ctx.device, ctx.dtype)
    if cfg.resolved_method == "twinflow":
        from fewstep.schedulers.twinflow import twinflow_sampler
        sched = twinflow_sampler(cfg.twinflow_target_step_count)  # the preset launcher/sample.py samples with
        one = torch.ones(1, device=x.device)
        return twinflow_loop(lambda x_, s, tt: model(x_, s, cond, tt=tt, sign=one), x.float(), sched,
                             cfg.twinflow_target_step_count, generator=generator), None
    scale = validation_cfg_scale(cfg, ctx.adapter)

    def guided(x_, s):  # v_uncond + scale * (v_cond - v_uncond), as the family's pipeline combines them
        v = model(x_, s, cond)
        if uncond is None or scale == 1.0:
            return v
        return ctx.adapter.guide(v, model(x_, s, uncond), scale)

    if phase.glance is None:
        base = flow_sigmas(cfg.validation_num_inference_steps, schedule_shift(
            *x.shape[-2:], cfg.flow_schedule_shift, cfg.flow_schedule_auto_shift))
        if not phase.sigmas:
            return euler_loop(guided, x, base), None
        sigmas, on_list = listed_schedule(phase.sigmas, base)  # the trained model at its sigmas, the base elsewhere
        at = 0
        for on, run in itertools.groupby(on_list):  # runs of steps taken by the same model
            n = len(list(run))
            with contextlib.nullcontext() if on else lora_disabled(ctx.engine):
                x = euler_loop(guided, x, sigmas[at:at + n + 1], to_zero=False)
            at += n
        return x, None
    # Glance: the image inference makes, Slow's list then Fast's. In the Slow phase the base model (LoRA off) stands
    # in for the untrained Fast; the Fast phase starts from the hand-off of the Slow phase's last validation.
    sigmas, boundary = glance_schedule(*phase.glance)
    slow_part, fast_part = sigmas[:boundary + 1], sigmas[boundary:]  # Slow stops where Fast starts
    if phase.name == "glance-slow":
        handoff = euler_loop(guided, x, slow_part, to_zero=False)
        with lora_disabled(ctx.engine):
            return euler_loop(guided, handoff, fast_part), handoff
    handoff = _read_handoff(cfg, x.shape, name, prompt)
    if handoff is None:
        log_main(distributed.rank() == 0, f"note: no {os.path.basename(_handoff_path(cfg, name))} of this shape and "
                                          "prompt from the Slow phase's validation; the Fast phase's validation starts "
                                          "from the base model's Slow steps")
        with lora_disabled(ctx.engine):
            handoff = euler_loop(guided, x, slow_part, to_zero=False)
    return euler_loop(guided, handoff.to(ctx.device, ctx.dtype), fast_part), None


@contextlib.contextmanager
def lora_disabled(engine):
    """The base model: the LoRA layers bypassed (PEFT flags on each layer, the same on every rank; no weight moves).
    PEFT also switches the LoRA weights' requires_grad off and back on: call it outside autograd (validation)."""
    module = unwrap(engine)
    has_lora = getattr(module, "_hf_peft_config_loaded", False)
    if has_lora:
        module.disable_adapters()
    try:
        yield
    finally:
        if has_lora:
            module.enable_adapters()


def _handoff_path(cfg, name: str = "") -> str:
    """The Slow phase's hand-off latents of the validation prompt, or of the library prompt `name`."""
    file = HANDOFF if not name else HANDOFF.replace(".safetensors", f"-{name}.safetensors")
    return os.path.join(cfg.output_dir, "validation", file)


def _read_handoff(cfg, shape, name: str = "", prompt: Optional[str] = None) -> Optional[torch.Tensor]:
    """Rank 0 reads the Slow phase's hand-off latents and every rank gets them; None if there is none of this shape
    (an output dir reused at another resolution) or, where `prompt` is given, of another prompt (a prompt edited
    between the phases), or it cannot be read (rank 0 must reach the broadcast)."""
    x = None
    if distributed.rank() == 0:
        with contextlib.suppress(OSError, SafetensorError, KeyError):
            saved = load_file(_handoff_path(cfg, name))
            if prompt is None or bytes(saved["prompt"].tolist()) == prompt.encode():
                x = saved["latents"]
        x = x if x is not None and tuple(x.shape) == tuple(shape) else None
    return distributed.broadcast_object(x)


def _write_handoff(cfg, latents: torch.Tensor, name: str = "", prompt: str = "") -> None:
    path = _handoff_path(cfg, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({"latents": latents.float(), "prompt": torch.tensor(list(prompt.encode()), dtype=torch.uint8)}, path)


def decode_on_device(adapter, vae, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Decode with the VAE on the training GPU for the call (a 1024 px decode takes well under a second there, and a
    minute on the host's CPU while every GPU idles), then back on the host, so that training keeps the GPU's memory.
    On the host (in fp32) if the GPU runs out of memory or cannot decode."""
    if device.type != "cuda":
        return adapter.decode_latents(vae, latents)
    try:
        vae.to(device)
        return adapter.decode_latents(vae, latents).cpu()
    except RuntimeError as e:  # out of memory, or a kernel the GPU lacks at this size: the host can still decode
        vae.to("cpu", torch.float32)  # bf16 convolutions on a CPU are slow
        torch.cuda.empty_cache()
        log_main(True, f"note: validation decodes on the host ({str(e).splitlines()[0][:120]})")
        return adapter.decode_latents(vae, latents)
    finally:
        vae.to("cpu")
        torch.cuda.empty_cache()


def _write_validation(ctx: StepContext, phase: Phase, step: int, logger, vae, latents: torch.Tensor,
                      name: str = "") -> None:
    """`name`: a user_prompt_library prompt's (its own file and TensorBoard tag); "" for the validation prompt."""
    from fewstep import faults

    pixels = decode_on_device(ctx.adapter, vae, latents, ctx.device)
    images = to_pil(pixels.float().cpu())
    out = os.path.join(ctx.cfg.output_dir, "validation")
    path = os.path.join(out, f"{phase.name}-step{step:06d}{f'-{name}' if name else ''}.png")
    try:  # whole or not at all: a resume from an earlier step renders the step again, over it
        os.makedirs(out, exist_ok=True)
        tmp = temporary_beside(path)
        with removed_on_failure(tmp):
            images[0].save(tmp, format="PNG")
            os.replace(tmp, path)
    except OSError as e:  # a full disk, a file named like the folder: the step's checkpoint was written before this
        raise UserError(f"validation image {path}: {e.strerror or e}; the checkpoints written so far are intact: "
                        "make room or fix the folder, then resume with resume_from_checkpoint latest") from None
    logger.image(f"validation/{phase.name}{'/' + name if name else ''}", grid(images), step)
    if ctx.twinflow_times and not name:
        from fewstep.metrics import trajectory_scatter
        logger.image("twinflow/trajectories (|t| vs tt, red = negative time)",
                     trajectory_scatter(ctx.twinflow_times), step)
    faults.work_at("validation")
