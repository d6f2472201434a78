"""Per-method pieces of the loop: training phases and the loss of one micro-batch (validation: `fewstep.validation`).

The maths lives in `fewstep.methods` (pure functions over tensors and callables); this module builds the callables
from the model adapter and the DeepSpeed engine and feeds them cached batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fewstep.engine.deepspeed_engine import inner_optimizer, load_master, reset_optimizer_state
from fewstep.metrics import log_main
from fewstep.methods.flow_matching import flow_matching_loss, sample_sigmas, schedule_shift
from fewstep.methods.glance import CustomTimestepSampler, foreign_reference_list, parse_custom_timesteps
from fewstep.step_context import StepContext, next_batch, velocity_fn
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
    another model family's Glance list (SimpleTuner's doc gives FLUX users Qwen-Image's)."""
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
    for group, lr in zip(inner_optimizer(engine).param_groups, scheduler.get_last_lr()):
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
