"""Non-finite gradients: this rank's verdict before the optimizer step, and a step that discards the update.

DeepSpeed 0.19.8 is not consistent about non-finite steps: its ZeRO and low-precision wrappers skip a step whose
gradient norm they find invalid, each with its own check and collectives, but stage-0 fp32 applies it, and under ZeRO-3
and optimizer offload the cleanup leaves the NaN in gradient buffers that later steps read for parameters that get no
new gradient; fp16 runs its own loss scaler. fewstep decides for itself, the same way in every stage and precision:

1. after the boundary micro-step's `engine.backward()`, `local_grad_check(engine)` looks, without any collective, at
   the gradients this rank's part of the coming optimizer step would read (its ZeRO partition, or all of them where
   every rank holds all of them);
2. the caller ORs `not check.finite` over ranks inside its one per-step reduction (`distributed.reduce_step`), so every
   rank takes the same decision from the same bits;
3. every rank then calls either `engine.step()` or, all together, `skip_step(engine)`, which runs `engine.step()`
   down DeepSpeed's own overflow path: the gradients are discarded; parameters, fp32 masters, the optimizer state
   (Adam moments, step counts) and the LR schedule are left exactly as they were.

A plain `engine.step()` can still skip on DeepSpeed's own say: finite gradients whose squared norm overflows fp32
(seen with ZeRO-1/2 and the stage-0 bf16 wrapper, whose norms end in fp32; ZeRO-3 keeps fp64 and applies the step).
`engine.was_step_applied()` tells, the same on every rank (the norm is all-reduced); count a step only when True.

Counters after a skip follow DeepSpeed's convention for overflow steps, in every layout: `engine.global_steps` and
`engine.skipped_steps` both advance (so applied steps = global_steps - skipped_steps = the LR scheduler's
`last_epoch`), `engine.was_step_applied()` is False, and `engine.get_global_grad_norm()` is inf (None stays None
for stage-0 fp32, where DeepSpeed never reports a norm).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from fewstep.engine.distributed import rank


@dataclass(frozen=True)
class GradCheck:
    """This rank's view of the gradients the coming optimizer step would use.

    - `finite`: every such gradient value this rank holds is finite (exact: huge finite values are finite).
    - `sq_norm`: this rank's share of the squared global gradient norm (pre-clipping, after DeepSpeed's division by
      the accumulation steps), summed in fp64: summed over ranks it is the squared norm DeepSpeed reports on a
      normal step. Where every rank holds all gradients (stage 0), rank 0 reports the sum and the others 0. With
      `reduce_step`, which averages, the global norm is `sqrt(mean * world_size)`. Non-finite exactly when `finite`
      is False (with fp64 norms: on an accelerator without fp64, also when a finite norm overflows fp32).
    """
    finite: bool
    sq_norm: float


# ---------------------------------------------------------------------------------------------------------------
# Where this rank's gradients are, per DeepSpeed optimizer wrapper
# ---------------------------------------------------------------------------------------------------------------

def _kind(opt) -> str:
    """Which DeepSpeed layout `engine.optimizer` is: zero3, zero12, bf16 (BF16_Optimizer: ZeRO-1 with bf16 weights
    and fp32 gradient accumulation), fp16 (FP16_Optimizer / FP16_UnfusedOptimizer: stage 0 with bf16 or fp16) or
    plain (stage 0 fp32: the basic torch optimizer itself)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls, kind in ((DeepSpeedZeroOptimizer_Stage3, "zero3"), (DeepSpeedZeroOptimizer, "zero12"),
                      (BF16_Optimizer, "bf16"), (FP16_Optimizer, "fp16"), (FP16_UnfusedOptimizer, "fp16")):
        if isinstance(opt, cls):
            return kind
    if isinstance(opt, torch.optim.Optimizer):
        return "plain"
    raise TypeError(f"non-finite check: DeepSpeed optimizer wrapper {type(opt).__name__} is not supported")


def _local_grads(opt, kind: str) -> tuple[list[torch.Tensor], bool]:
    """(the gradient tensors this rank's coming step reads, whether every rank holds all of them).

    At the boundary, after `engine.backward()`, DeepSpeed has reduced them across ranks and put them where its
    step reads them (the places its own `has_overflow*` / `scaled_global_norm` / `_get_norm_groups` look):
    - ZeRO-3: `averaged_gradients[i]` (this rank's partition of each parameter, views of
      `grad_partitions_flat_buffer`); with offload_optimizer the fp32 partition's `.grad` on the CPU.
    - ZeRO-1/2: `averaged_gradients[i]` (this rank's slice of each parameter in its partition); with
      offload_optimizer the fp32 partition's `.grad` on the CPU.
    - BF16_Optimizer: the fp32 gradient partition it hands its optimizer (`fp32_groups_gradient_flat_partition`).
    - stage 0: every parameter's `.grad` (the low-precision model weights' under the FP16 wrappers), all-reduced.
    """
    if kind == "zero3":
        if opt.offload_optimizer:
            if opt.swap_optimizer:
                raise NotImplementedError("non-finite check: NVMe optimizer offload keeps the gradients on disk")
            return [g.grad for g in opt.fp32_partitioned_groups_flat if g.grad is not None], False
        return [t for i in range(len(opt.fp16_groups)) for t in (opt.averaged_gradients.get(i) or ())
                if t is not None], False
    if kind == "zero12":
        if opt.cpu_offload:
            return [g.grad for g in opt.single_partition_of_fp32_groups if g.grad is not None], False
        return [t for grads in opt.averaged_gradients.values() if grads is not None for t in grads
                if t is not None], False
    if kind == "bf16":
        return list(opt.fp32_groups_gradient_flat_partition), False
    groups = opt.fp16_groups if kind == "fp16" else [g["params"] for g in opt.param_groups]
    return [p.grad for group in groups for p in group if p.grad is not None], True


def _offloaded(opt, kind: str) -> bool:
    return kind == "zero3" and opt.offload_optimizer or kind == "zero12" and opt.cpu_offload


def _norm_dtype() -> torch.dtype:
    """fp64 where the accelerator has it, as DeepSpeed's own norms: squares of fp32/bf16 values cannot overflow it,
    so a non-finite sum means a non-finite element, and huge finite gradients get their true norm."""
    from deepspeed.accelerator import get_accelerator
    return torch.float64 if get_accelerator().is_fp64_supported() else torch.float32


def _sq_norms(tensors: list[torch.Tensor]) -> list[float]:
    """Squared 2-norm of each tensor, read back with one transfer per device. Tensors up to a chunk go through one
    multi-tensor norm (a LoRA's per-parameter gradients are thousands of small tensors: one launch, not thousands);
    larger ones (a flat partition can hold billions of values, and the norm dtype copies what it reads) in chunks."""
    dtype = _norm_dtype()
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = [0.0] * len(tensors)
    for idx in by_device.values():
        small = [i for i in idx if tensors[i].numel() <= CHUNK]
        large = [i for i in idx if tensors[i].numel() > CHUNK]
        sq = [n.square() for n in torch._foreach_norm([tensors[i] for i in small], 2, dtype=dtype)] if small else []
        sq += [torch.stack([torch.linalg.vector_norm(c, dtype=dtype).square() for c in _chunks(tensors[i])]).sum()
               for i in large]
        for i, v in zip(small + large, torch.stack(sq).tolist()):
            out[i] = v
    return out


CHUNK = 1 << 24  # values per norm call on a large tensor (its fp64 copy: 128 MiB)


def _chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return t.reshape(-1).split(CHUNK)


def all_finite(t: torch.Tensor) -> bool:
    """Element by element, in chunks (the check's boolean copy stays small whatever the tensor's size). The gradient
    check needs it only where the norm is taken in fp32 (no fp64 on the accelerator)."""
    return all(bool(torch.isfinite(c).all()) for c in _chunks(t))


@torch.no_grad()
def local_grad_check(engine) -> GradCheck:
    """Call on every rank at the boundary micro-step, after `engine.backward()` and before stepping. No collective:
    the caller ORs `not finite` over ranks (gradients were reduced in backward, so a NaN on one rank's loss normally
    reaches every partition, but only the OR over all partitions covers every value).

    One squared norm per gradient tensor (fp64), one device-to-host read per device.
    """
    if not engine.is_gradient_accumulation_boundary():
        raise RuntimeError("local_grad_check: call it at the gradient accumulation boundary (the micro-step whose "
                           "engine.step() steps the optimizer), after engine.backward()")
    opt = engine.optimizer
    kind = _kind(opt)
    tensors, replicated = _local_grads(opt, kind)
    if _offloaded(opt, kind):  # the gradients reach the CPU by non-blocking copies from the accelerator
        from deepspeed.accelerator import get_accelerator
        get_accelerator().synchronize()
    sq = _sq_norms(tensors)
    finite = all(math.isfinite(n) or all_finite(t) for t, n in zip(tensors, sq))
    sq_norm = math.fsum(sq)
    if replicated and rank() != 0 and math.isfinite(sq_norm):
        sq_norm = 0.0
    return GradCheck(finite, sq_norm)


@torch.no_grad()
def clip_grad_values(engine, limit: float) -> None:
    """Clamp every gradient value the coming optimizer step reads to [-limit, limit] (SimpleTuner's
    `grad_clip_method: value`, torch's clip_grad_value_), in place, on this rank's share; no collective (clamping is
    element by element, so each partition is clamped alone). Call after `local_grad_check` (its synchronisation
    covers offloaded gradients) and before `engine.step()`. A loss scale, where the wrapper keeps one, scales the
    limit: the stored gradients are scaled, and the step unscales them. BF16_Optimizer's partition is a view of the
    flat buffer of every gradient its norm reads: the whole buffer is clamped, so that the norm is the clamped one."""
    opt = engine.optimizer
    kind = _kind(opt)
    scale = float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None) or 1.0)
    tensors = list(opt.fp32_groups_gradients_flat) if kind == "bf16" else _local_grads(opt, kind)[0]
    groups: dict[tuple, list[torch.Tensor]] = {}  # a LoRA's thousands of small gradients: one launch per group
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        torch._foreach_clamp_min_(group, -limit * scale)
        torch._foreach_clamp_max_(group, limit * scale)


# ---------------------------------------------------------------------------------------------------------------
# Skipping the update through DeepSpeed's own overflow path
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def overridden(obj, attrs: dict):
    """Set instance attributes for the duration of the block, then restore exactly what was there (an instance
    attribute, e.g. the LR scheduler's wrapper around a torch optimizer's `step`, or none: the class's)."""
    missing = object()
    saved = {name: vars(obj).get(name, missing) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def _bf16_skip(opt) -> None:
    """BF16_Optimizer.step's own invalid-norm branch (it has no overflow check to force)."""
    opt.overflow = True
    opt._global_grad_norm = float("inf")
    opt.clear_hp_grads()
    opt.clear_lp_grads()


def _forced_overflow(opt, kind: str):
    """Per-instance overrides that make the wrapper's next `step()` take DeepSpeed's overflow path, which discards
    the gradients and leaves weights, masters and optimizer state alone; `engine._take_model_step` then sees
    `optimizer.overflow` and neither steps the LR scheduler nor counts an applied step.

    - ZeRO-3: `_overflow_check_and_loss_scale_update` reports overflow (its normal check only looks at fp16); step()
      still runs its prologue (`_pre_step`, re-partitioning) and then `_loss_scale_update_and_overflow_cleanup`.
    - ZeRO-1/2: `check_overflow` reports overflow (and `check_grad_overflow` makes step() ask it); step() resets its
      micro-step, waits for offload copies, then zeroes grads, drops `averaged_gradients` / resets the CPU buffers.
    - FP16 wrappers: step() is their `_skip_invalid_grad_norm`; BF16_Optimizer: its invalid-norm branch.
    - plain torch optimizer: step() does nothing and `overflow` is True; the engine zeroes the grads itself.
    The collectives the overridden checks would issue (overflow all-reduces) are skipped on every rank alike.
    """
    if kind == "zero3":
        def check(update_scale=True):
            opt.overflow = True
            return opt._loss_scale_update_and_overflow_cleanup() if update_scale else True
        return overridden(opt, {"_overflow_check_and_loss_scale_update": check})
    if kind == "zero12":
        return overridden(opt, {"check_grad_overflow": True,
                                 "check_overflow": lambda partition_gradients=True: setattr(opt, "overflow", True)})
    if kind == "bf16":
        return overridden(opt, {"step": lambda closure=None: _bf16_skip(opt)})
    if kind == "fp16":
        return overridden(opt, {"step": lambda closure=None: opt._skip_invalid_grad_norm()})
    return overridden(opt, {"step": lambda closure=None: None, "overflow": True})


def _persistent_grad_buffers(opt, kind: str) -> list[torch.Tensor]:
    """Gradient buffers DeepSpeed's overflow cleanup leaves filled and its next step reads for every parameter,
    including one that gets no gradient then (its slot is only overwritten when a gradient arrives):
    ZeRO-3's flat partition buffer, and the CPU fp32 gradient partitions under offload_optimizer."""
    if kind == "zero3":
        out = [opt.grad_partitions_flat_buffer]
        if opt.offload_optimizer:
            out += [g.grad for g in opt.fp32_partitioned_groups_flat]
        return [t for t in out if t is not None]
    if kind == "zero12" and opt.cpu_offload:
        return [g.grad for g in opt.single_partition_of_fp32_groups if g.grad is not None]
    return []


@torch.no_grad()
def skip_step(engine) -> None:
    """Call instead of `engine.step()` at the boundary micro-step, on every rank together (the decision must come
    from a reduction, as the overridden checks' collectives are skipped): the accumulated gradients are discarded,
    nothing else changes, and the engine is ready for the next step.

    The wrapper's `step()` is forced down DeepSpeed's overflow path for this one call (`_forced_overflow`); then the
    persistent gradient buffers are zeroed, so that a NaN in the slot of a parameter that gets no gradient in the
    next steps cannot reach them (or make every later check fail).
    """
    if not engine.is_gradient_accumulation_boundary():
        raise RuntimeError("skip_step: call it instead of engine.step() at the gradient accumulation boundary")
    from deepspeed.accelerator import get_accelerator

    opt = engine.optimizer
    kind = _kind(opt)
    with _forced_overflow(opt, kind):
        engine.step()
    if engine.was_step_applied():
        raise RuntimeError(f"skip_step: DeepSpeed applied the update ({type(opt).__name__} did not take its overflow "
                           "path); this DeepSpeed version is not supported")
    buffers = _persistent_grad_buffers(opt, kind)
    if buffers:
        get_accelerator().synchronize()  # DeepSpeed's copies into them run on its own streams
        for t in buffers:
            t.zero_()
        get_accelerator().synchronize()


# ---------------------------------------------------------------------------------------------------------------
# The weights themselves, before anything is saved or exported
# ---------------------------------------------------------------------------------------------------------------

def local_weights_finite(params) -> bool:
    """Whether the trained weights this rank holds are finite (no collective; the caller ORs over ranks).

    Checks what the model computes with: the full parameter where every rank holds it (stages 0-2), this rank's
    ZeRO-3 shard otherwise, without the partition's padding (uninitialised memory at the end of the last rank's
    shard, which may hold any bit pattern).
    """
    for p in params:
        values = owned_values(p)
        if values.numel() and not all_finite(values):
            return False
    return True


def owned_values(p, at_rank: int | None = None):
    """The values of parameter `p` that rank `at_rank` (default: this one) holds, flat: the full parameter where
    every rank holds it (stages 0-2), its ZeRO-3 shard without the partition's padding otherwise (uninitialised
    memory at the end of the last rank's shard)."""
    if not hasattr(p, "ds_tensor"):
        return p.data.view(-1)
    part = p.ds_tensor.view(-1)
    owned = max(0, min(part.numel(), p.ds_numel - (rank() if at_rank is None else at_rank) * part.numel()))
    return part[:owned]
