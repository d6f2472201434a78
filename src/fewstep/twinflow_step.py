"""TwinFlow wiring: turn the engine and model adapter into the `student` / `teacher` callables of
`fewstep.methods.twinflow.twinflow_loss`.

The EMA teacher is this rank's fp32 EMA partition swapped into the model (`weights_swapped_in`): no second copy of the
model exists and nothing goes to the CPU. The swap is entered lazily at the first teacher call and left before the
next student call (and before backward), so every pass sees the right weights whatever order the method uses.
"""
from __future__ import annotations

import torch

from fewstep.engine import distributed
from fewstep.engine.deepspeed_engine import weights_swapped_in
from fewstep.metrics import log_main
from fewstep.methods.twinflow import twinflow_loss
from fewstep.methods.twinflow_times import assign_groups, rectify_rows, steps_for_every_group
from fewstep.step_context import StepContext, next_batch, velocity_fn


class TeacherWeights:
    """Tracks whether the EMA weights are swapped into the model; `use(True/False)` switches lazily."""

    def __init__(self, engine, ema):
        self.engine, self.ema, self._ctx = engine, ema, None

    def use(self, teacher: bool) -> None:
        if teacher and self._ctx is None:
            self._ctx = weights_swapped_in(self.engine, self.ema.shadow)
            self._ctx.__enter__()
        elif not teacher and self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)


def has_dropout(module: torch.nn.Module) -> bool:
    """Whether any dropout layer of `module` (nn.Dropout, Dropout1d/2d/3d, AlphaDropout, ...) drops something
    (p > 0; diffusers' transformers carry p = 0 ones, and PEFT's LoRA dropout 0 is an Identity)."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def any_step_model(velocity) -> callable:
    """model(x, t, tt, cond) with signed times -> velocity(x, |t|, cond, tt=|tt|, sign=sign(t))."""
    def model(x, t, tt, cond):
        sign = torch.where(t < 0, -1.0, 1.0).to(t.device)
        return velocity(x, t.abs().float(), cond, tt=tt.abs().float(), sign=sign)
    return model


def make_twinflow_step(ctx: StepContext):
    cfg, engine, ema = ctx.cfg, ctx.engine, ctx.ema
    model = any_step_model(velocity_fn(ctx))
    use_ema_teacher = ema is not None and 0.0 < cfg.ema_decay
    weights = TeacherWeights(engine, ema) if use_ema_teacher else None
    needed = steps_for_every_group(cfg.train_batch_size, adversarial=cfg.twinflow_adversarial_enabled,
                                   weights=cfg.twinflow_group_weights)
    if cfg.gradient_accumulation_steps < needed:
        log_main(distributed.rank() == 0, f"note: at train_batch_size {cfg.train_batch_size} TwinFlow's groups (e2e, "
                                          "mul, any, adv) cycle over micro-steps, the same on every rank, so each "
                                          "optimizer step trains only some of them; gradient_accumulation_steps "
                                          f"{needed} gives every step all of them")
    if ema is not None and ema.frozen and 0.0 < cfg.twinflow_enhanced_ratio < 1.0:
        log_main(distributed.rank() == 0, f"note: with a frozen teacher (ema_decay 1) the CFG-enhanced target is the "
                                          "teacher's guided field at CFG scale twinflow_enhanced_ratio "
                                          f"({cfg.twinflow_enhanced_ratio:g}), as the reference: below 1 it lies "
                                          "between the teacher's unconditional and conditional predictions")
    if not cfg.twinflow_adversarial_enabled:
        log_main(distributed.rank() == 0, "note: twinflow_adversarial_enabled is false (SimpleTuner's default): this "
                                          "trains RCGM with the CFG-enhanced target, without TwinFlow's "
                                          "self-adversarial branch (L_adv, L_rectify), which the shipped configs "
                                          "turn on")
    # Teacher passes run on the rows whose output is used, unless a dropout layer would then draw other masks than
    # the student pass did (the passes replay its RNG state; LoRA dropout > 0 is the usual case).
    used_rows_only = cfg.twinflow_teacher_rows == "used"
    if used_rows_only and has_dropout(engine.module):
        used_rows_only = False
        log_main(distributed.rank() == 0, "note: the model has dropout, so TwinFlow's teacher passes run on the whole "
                                          "batch (twinflow_teacher_rows: used needs none: a sub-batch would draw "
                                          "other dropout masks than the student pass they replay)")

    def student(x, t, tt, cond):
        if weights is not None:
            weights.use(False)
        return model(x, t, tt, cond)

    def teacher(x, t, tt, cond):
        if weights is not None:
            weights.use(True)
        return model(x, t, tt, cond)

    def step(micro: int):
        x0, cond, uncond = next_batch(ctx, with_uncond=True)
        # Groups cycle over *all* micro-steps, so batch sizes < 4 still see e2e/mul/any/adv rows in turn. The data
        # order's slot counts them (those of skipped steps too) and is checkpointed: a resume continues the cycle.
        groups = assign_groups(x0.shape[0], ctx.order.slot - 1, adversarial=cfg.twinflow_adversarial_enabled,
                               weights=cfg.twinflow_group_weights)
        try:
            loss, logs = twinflow_loss(
                student, teacher if weights is not None else student, x0, cond, uncond,
                groups=groups, order=cfg.twinflow_estimate_order, delta_t=cfg.twinflow_delta_t,
                clamp=cfg.twinflow_target_clamp, enhanced_ratio=cfg.twinflow_enhanced_ratio,
                enhanced_range=tuple(cfg.twinflow_enhanced_range), adversarial=cfg.twinflow_adversarial_enabled,
                adversarial_weight=cfg.twinflow_adversarial_weight, rectify_weight=cfg.twinflow_rectify_weight,
                frozen_teacher=(ema is not None and ema.frozen),
                rectify_rows=rectify_rows(x0.shape[0], weights=cfg.twinflow_group_weights),
                backend=ctx.backend, used_rows_only=used_rows_only)
        finally:
            if weights is not None:
                weights.use(False)  # the live weights are back before backward
        t, tt = logs.pop("times")
        ctx.twinflow_times.extend(zip(t.tolist(), tt.tolist()))  # recent rows for the trajectory scatter
        del ctx.twinflow_times[:-1024]
        return loss, {k: v for k, v in logs.items() if k != "loss"}

    return step
