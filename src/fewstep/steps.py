"""Per-method pieces of the loop: training phases, the loss of one micro-batch, and validation sampling.

The maths lives in `fewstep.methods` (pure functions over tensors and callables); this module builds the callables
from the model adapter and the DeepSpeed engine and feeds them cached batches.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fewstep.data.cache import atomic_save
from fewstep.engine import distributed
from fewstep.engine.deepspeed_engine import load_master, reset_optimizer_state
from fewstep.metrics import log_main
from fewstep.methods.flow_matching import flow_matching_loss, sample_sigmas, schedule_shift
from fewstep.methods.glance import (CustomTimestepSampler, foreign_reference_list, glance_schedule,
                                    listed_schedule, parse_custom_timesteps)
from fewstep.models.base import unwrap
from fewstep.sampling import euler_loop, flow_sigmas, grid, to_pil, twinflow_loop
from fewstep.step_context import StepContext, next_batch, to_device, velocity_fn
from fewstep.twinflow_step import make_twinflow_step


@dataclass
class Phase:
    """A stretch of training with one timestep rule and one export: Glance has two (Slow, Fast)."""
    name: str
    steps: int
    sigmas: Optional[list[float]] = None  # custom training sigmas (Glance), else None
    sampler: Optional[CustomTimestepSampler] = None
    export_subdir: str = ""
    glance: Optional[tuple[list[float], list[float]]] = None  # Glance's (Slow, Fast) lists: validation chains them


def build_phases(cfg, info) -> list[Phase]:
    """The training phases: one per Glance LoRA (Slow then Fast), else one. Warns on rank 0 when a timestep list is
    another model family's Glance list (SimpleTuner's doc gives FLUX users Qwen-Image's), and when TwinFlow is given
    a validation guidance it does not use."""
    ignored = {k: getattr(cfg, k) for k in ("validation_guidance", "validation_guidance_real")
               if (getattr(cfg, k, None) or 0.0) > 1.0}
    if cfg.resolved_method == "twinflow" and ignored:
        log_main(info.is_main, f"warning: {', '.join(f'{k!r} {v}' for k, v in ignored.items())} not used: TwinFlow "
                               "samples without classifier-free guidance (its target distils it), at the training "
                               "guidance value")
    def sampler(sigmas):
        return CustomTimestepSampler(sigmas, cfg.flow_timesteps_mode, batch_size=cfg.train_batch_size,
                                     rank=info.rank, world_size=info.world_size)

    method = cfg.resolved_method
    if method == "glance":
        slow = parse_custom_timesteps(cfg.glance_slow_timesteps, "glance_slow_timesteps")
        fast = parse_custom_timesteps(cfg.glance_fast_timesteps, "glance_fast_timesteps")
        _warn_foreign_lists(cfg, info, {"glance_slow_timesteps": slow, "glance_fast_timesteps": fast})
        return [Phase("glance-slow", cfg.max_train_steps, slow, sampler(slow), "glance-slow", (slow, fast)),
                Phase("glance-fast", cfg.max_train_steps, fast, sampler(fast), "glance-fast", (slow, fast))]
    if cfg.flow_custom_timesteps is not None:
        sig = parse_custom_timesteps(cfg.flow_custom_timesteps)
        _warn_foreign_lists(cfg, info, {"flow_custom_timesteps": sig})
        return [Phase(method, cfg.max_train_steps, sig, sampler(sig))]
    return [Phase(method, cfg.max_train_steps)]


def _warn_foreign_lists(cfg, info, lists: dict[str, list[float]]) -> None:
    for key, sigmas in lists.items():
        note = foreign_reference_list(cfg.model_family, sigmas)
        if note:
            log_main(info.is_main, f"warning: '{key}': {note}")


def reset_trainable(engine, initial_weights, scheduler, initial_sched) -> None:
    """Start the next Glance phase from the same LoRA initialisation, fresh Adam state and LR schedule."""
    load_master(engine, initial_weights)
    reset_optimizer_state(engine)
    scheduler.load_state_dict(initial_sched)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group, lr in zip(inner.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def make_step(method: str, phase: Phase, ctx: StepContext) -> Callable[[int], tuple[torch.Tensor, dict]]:
    if method == "twinflow":
        return make_twinflow_step(ctx)
    cfg, model = ctx.cfg, velocity_fn(ctx)

    def flow_step(micro: int):
        x0, cond, _ = next_batch(ctx)
        if phase.sampler is not None:  # Glance / custom list: no shift, ever
            sigma = phase.sampler.sample()
        else:
            shift = schedule_shift(*x0.shape[-2:], cfg.flow_schedule_shift, cfg.flow_schedule_auto_shift)
            sigma = sample_sigmas(x0.shape[0], uniform=cfg.flow_use_uniform_schedule, logit_mean=cfg.flow_logit_mean,
                                  logit_std=cfg.flow_logit_std, shift=shift)
        loss, _ = flow_matching_loss(model, x0, sigma, cond)
        return loss, {"sigma_mean": sigma.mean().item()}
    return flow_step


HANDOFF = "glance-slow-handoff.safetensors"  # under <output_dir>/validation: where Slow's validation stopped


def validation_cfg_scale(cfg, adapter) -> float:
    """Classifier-free guidance of validation images (1: none): `validation_guidance`, or for a guidance-distilled
    family (FLUX) `validation_guidance_real` (SimpleTuner's meanings); by default the family's (as
    launcher/sample.py: Qwen-Image 5); TwinFlow never (its target distils guidance)."""
    if cfg.resolved_method == "twinflow":
        return 1.0
    given = cfg.validation_guidance_real if adapter.distilled_guidance else cfg.validation_guidance
    return max(float(adapter.sample_cfg_scale if given is None else given), 1.0)


def validation_distilled_guidance(cfg, adapter) -> Optional[float]:
    """The distilled-guidance value of validation images (FLUX: `validation_guidance`; None: the training value).
    TwinFlow samples at the training value."""
    if cfg.resolved_method == "twinflow" or not adapter.distilled_guidance:
        return None
    return cfg.validation_guidance


@torch.no_grad()
def sample_latents(ctx: StepContext, phase: Phase, cond: dict, generator: torch.Generator,
                   uncond: Optional[dict] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validation sampling with the current weights (all ranks take part: ZeRO-3 forwards are collective). Returns
    the latents and, in Glance's Slow phase, the hand-off latents (where Slow stops and Fast starts)."""
    cfg = ctx.cfg
    model = velocity_fn(ctx, validation_distilled_guidance(cfg, ctx.adapter))
    ds = ctx.dataset  # a square at the training resolution (datasets without buckets: the first latent's shape)
    shape = (1, *(ds.validation_shape if hasattr(ds, "validation_shape") else ds.latents[0].shape))
    x = torch.randn(shape, generator=generator).to(ctx.device, ctx.dtype)
    if cfg.resolved_method == "twinflow":
        from fewstep.schedulers import TwinFlowScheduler
        from fewstep.schedulers.twinflow import twinflow_preset
        n = cfg.twinflow_target_step_count  # sampled with the same preset as launcher/sample.py
        sched = TwinFlowScheduler(num_train_timesteps=1000, prediction_type="flow_matching", **twinflow_preset(n))
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
    handoff = _read_handoff(cfg, x.shape)
    if handoff is None:
        log_main(distributed.rank() == 0, f"note: no {HANDOFF} of this shape from the Slow phase's validation; the "
                                          "Fast phase's validation starts from the base model's Slow steps")
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


def _read_handoff(cfg, shape) -> Optional[torch.Tensor]:
    """Rank 0 reads the Slow phase's hand-off latents and every rank gets them; None if there is none of this shape
    (an output dir reused at another resolution) or it cannot be read (rank 0 must reach the broadcast)."""
    x = None
    if distributed.rank() == 0:
        path = os.path.join(cfg.output_dir, "validation", HANDOFF)
        with contextlib.suppress(OSError, SafetensorError, KeyError):
            x = load_file(path)["latents"]
        x = x if x is not None and tuple(x.shape) == tuple(shape) else None
    return distributed.broadcast_object(x)


def _write_handoff(cfg, latents: torch.Tensor) -> None:
    out = os.path.join(cfg.output_dir, "validation")
    os.makedirs(out, exist_ok=True)
    atomic_save({"latents": latents.float()}, os.path.join(out, HANDOFF))


def validate(ctx: StepContext, phase: Phase, step: int, logger, vae, is_main: bool) -> None:
    """Render the validation prompt with a fixed seed (every rank samples: ZeRO-3 forwards are collective); rank 0
    decodes, writes a PNG and logs it to TensorBoard while the others wait without a collective timeout."""
    cfg, ds, engine = ctx.cfg, ctx.dataset, ctx.engine
    cond, uncond = (to_device(ctx.adapter.collate_cond([ds.text[p]]), ctx.device, ctx.dtype)
                    for p in validation_prompts(cfg, ds, ctx.adapter))
    engine.eval()
    latents, handoff = sample_latents(ctx, phase, cond, torch.Generator().manual_seed(cfg.validation_seed), uncond)
    engine.train()
    with distributed.uneven_work("validation"):
        if is_main:
            if handoff is not None:
                _write_handoff(cfg, handoff)
            _write_validation(ctx, phase, step, logger, vae, latents)


def validation_prompts(cfg, ds, adapter) -> tuple[str, str]:
    """The validation prompt (default: the first training caption) and the negative one of its classifier-free
    guidance (`validation_negative`); both were cached with the data set (`fewstep.data.prepare`)."""
    prompt = cfg.validation_prompt if cfg.validation_prompt is not None else ds.samples[0].caption
    return prompt, validation_negative(cfg, adapter)


def validation_negative(cfg, adapter) -> str:
    """Validation's negative prompt: `validation_negative_prompt`, or where validation guides the family's default
    (launcher/sample.py's); without guidance, the empty prompt (cached anyway: nothing more to encode)."""
    if cfg.validation_negative_prompt is not None:  # "" included, as sample.py's --negative-prompt ""
        return cfg.validation_negative_prompt
    return adapter.default_negative_prompt if validation_cfg_scale(cfg, adapter) > 1 else ""


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


def _write_validation(ctx: StepContext, phase: Phase, step: int, logger, vae, latents: torch.Tensor) -> None:
    from fewstep import faults

    pixels = decode_on_device(ctx.adapter, vae, latents, ctx.device)
    images = to_pil(pixels.float().cpu())
    out = os.path.join(ctx.cfg.output_dir, "validation")
    os.makedirs(out, exist_ok=True)
    images[0].save(os.path.join(out, f"{phase.name}-step{step:06d}.png"))
    logger.image(f"validation/{phase.name}", grid(images), step)
    if ctx.twinflow_times:
        from fewstep.metrics import trajectory_scatter
        logger.image("twinflow/trajectories (|t| vs tt, red = negative time)",
                     trajectory_scatter(ctx.twinflow_times), step)
    faults.work_at("validation")
