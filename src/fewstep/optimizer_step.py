"""One optimizer step on every rank: the micro-batches' forward and backward, the step's single reduction (logged
means, preemption and non-finite flags), then the update, or no update at all where some rank saw a non-finite value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep import faults, preemption
from fewstep.engine import distributed, nonfinite
from fewstep.engine.distributed import DistInfo
from fewstep.engine.nonfinite_trace import NonFiniteTrace
from fewstep.metrics import log_main
from fewstep.nan_guard import NonFiniteGuard


@dataclass
class StepOutcome:
    applied: bool      # the optimizer update was taken (False: skipped, nothing of the step reached the model)
    logs: dict         # rank means of the logged terms
    preempt: bool      # some rank was signalled
    grad_norm: float   # the global gradient norm before clipping, the same way in every layout (DeepSpeed keeps
                       # none at stage 0 fp32)


def optimizer_step(engine, step_fn, accumulation: int, step: int, info: DistInfo, guard: NonFiniteGuard,
                   trace: NonFiniteTrace | None = None, clip_value: float = 0.0):
    """One optimizer step on every rank: micro-batches, the step's single reduction (logged means, preemption and
    non-finite flags), then the update, or, if any rank saw a non-finite loss or gradient, no update at all.
    `clip_value` > 0: each gradient value is clipped to it first (grad_clip_method value; the logged norm is the
    unclipped one)."""
    if trace is not None:
        trace.reset()
    logs, loss_finite = run_micro_steps(engine, step_fn, accumulation, step, info.rank)
    grads = nonfinite.local_grad_check(engine)  # at the boundary, before the optimizer step; no collective
    faults.signal_if("FEWSTEP_FAULT_SIGNAL_AT_STEP", step)
    bad_terms = [k for k, v in logs.items() if not math.isfinite(v)]  # this rank's, to say where it went wrong
    logs, flags = distributed.reduce_step({**logs, "grad_sq_norm": grads.sq_norm},
                                          {"preempt": preemption.requested(), "loss": not loss_finite,
                                           "grads": not grads.finite})
    grad_norm = math.sqrt(logs.pop("grad_sq_norm") * info.world_size)  # the ranks' shares summed (GradCheck)
    if flags["loss"] or flags["grads"]:  # parameters, optimizer state, LR schedule and step count stay as they were
        nonfinite.skip_step(engine)
        what = " and ".join(name for name, bad in (("loss", flags["loss"]), ("gradients", flags["grads"])) if bad)
        reason = f"non-finite {what} (on some rank{'; here: ' + ', '.join(bad_terms) if bad_terms else ''})"
        if trace is not None:
            reason += f"; {trace.report()}"
    else:
        if clip_value > 0:
            nonfinite.clip_grad_values(engine, clip_value)
        if take_optimizer_step(engine):
            guard.good()
            return StepOutcome(True, logs, flags["preempt"], grad_norm)
        reason = "gradient norm not finite"  # DeepSpeed itself found it invalid (e.g. overflowing)
    log_main(info.is_main, f"step {step}: {reason}: update skipped")
    guard.bad(step)  # raises NonFiniteStop when nan_policy says so
    return StepOutcome(False, logs, flags["preempt"], grad_norm)


def take_optimizer_step(engine) -> bool:
    """engine.step() at the accumulation boundary; whether DeepSpeed applied it (it skips an invalid norm itself)."""
    engine.step()
    return engine.was_step_applied()


def run_micro_steps(engine, step_fn, accumulation: int, step: int, rank: int) -> tuple[dict, bool]:
    """Forward and backward of every micro-batch of one optimizer step, stopping short of the optimizer step itself
    (the caller decides, with every rank, whether to take it). Returns the micro-averaged logged terms and whether
    every loss was finite. The loss and the terms a method computes on the device are summed there and read in one
    copy at the end: a read waits for the GPU, and one per micro-step would keep the host from preparing the next
    micro-batch while the GPU runs this one's backward."""
    sums = {}
    for micro in range(accumulation):
        loss, terms = step_fn(micro)
        loss = faults.nan_loss_if(loss, step, rank)
        engine.backward(loss)
        if micro < accumulation - 1:
            engine.step()  # not the accumulation boundary: DeepSpeed only counts the micro-step
        for k, v in {"loss": loss, **terms}.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
            sums[k] = sums.get(k, 0.0) + v
    logs = {k: v / accumulation for k, v in read_numbers(sums).items()}
    return logs, math.isfinite(logs["loss"])  # a sum of fp32 losses is finite exactly when every one is


def read_numbers(terms: dict) -> dict[str, float]:
    """Numbers and 0-d tensors as floats, the tensors read in one copy per device they are on."""
    by_device: dict[torch.device, list[str]] = {}
    for k, v in terms.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    numbers = {}
    for keys in by_device.values():
        numbers.update(zip(keys, torch.stack([terms[k].detach().double().reshape(()) for k in keys]).tolist()))
    return {k: numbers[k] if k in numbers else float(v) for k, v in terms.items()}
