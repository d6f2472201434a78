"""DeepSpeed set-up: the generated ZeRO config, `deepspeed.initialize`, and access to this rank's fp32 master
partition (what the EMA tracks and what the EMA teacher is swapped into). The process group is set up by
`fewstep.engine.distributed`.
"""
from __future__ import annotations

import contextlib
import math

import torch

from fewstep.config import zero_stage_in_use
from fewstep.engine.ds_config_checks import check_merged, describe, read_user_config


def build_ds_config(cfg, stage: int | None = None) -> dict:
    """The DeepSpeed config generated from fewstep's options; `deepspeed_config` entries override it.

    The ZeRO stage is the user file's `zero_optimization.stage` if it sets one (e.g. configs/deepspeed/zero3.json),
    else `zero_stage`; the stage-3 defaults below follow it. `stage` overrides both (the planner's view of the same
    options at another stage). The merged result is checked before anything is built.
    """
    user = _read_user_config(cfg.deepspeed_config)
    if stage is not None:
        user.get("zero_optimization", {}).pop("stage", None)
    else:
        stage = zero_stage_in_use(cfg.zero_stage, user)
    zero = {"stage": stage, "overlap_comm": torch.cuda.is_available(), "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if stage == 3:
        # With an EMA teacher every parameter must be re-gathered from its shard at each forward, so that swapping
        # the EMA into the shards reaches all of them: no "persistent" small parameters then.
        zero.update(stage3_prefetch_bucket_size=5e7,
                    stage3_param_persistence_threshold=0 if cfg.use_ema else 1e5,
                    stage3_gather_16bit_weights_on_model_save=False)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        # the global-norm clip; grad_clip_method value clamps each element instead (`nonfinite.clip_grad_values`)
        "gradient_clipping": cfg.max_grad_norm if cfg.grad_clip_method == "norm" else 0.0,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # optimizer adamw + offload_optimizer: torch AdamW on the CPU partitions
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        # DeepSpeed's samples/s timer synchronises the GPU at every forward and step (its default): the host then
        # cannot queue ahead. fewstep logs its own step times.
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.optimizer == "deepspeed":
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_epsilon,
            "weight_decay": cfg.adam_weight_decay}}
    _deep_update(ds, user)
    source = describe(cfg.deepspeed_config) if cfg.deepspeed_config else "fewstep's options"
    check_merged(ds, user, source, bf16=cfg.bf16, use_ema=cfg.use_ema)
    return ds


def _read_user_config(value) -> dict:
    user = read_user_config(value)  # read and checked as Config.validate did
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        user.pop(key, None)  # fewstep's batch options are the single source of truth
    return user


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def lr_lambda(cfg):
    """Warmup then constant / linear decay / cosine decay / polynomial decay to lr_end (SimpleTuner's, as
    transformers' get_polynomial_decay_schedule_with_warmup), as a multiplier of the peak LR."""
    warm, total = cfg.lr_warmup_steps, max(cfg.max_train_steps, 1)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_scheduler in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        if cfg.lr_scheduler == "polynomial":
            end = cfg.lr_end / cfg.learning_rate
            return end + (1.0 - end) * (1.0 - progress) ** cfg.lr_power
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_engine(cfg, model: torch.nn.Module, trainable: list[torch.nn.Parameter], ds_config: dict | None = None):
    """`deepspeed.initialize` with a client torch AdamW (no JIT build), or with `optimizer: deepspeed` the AdamW
    DeepSpeed builds from the config (FusedAdam; DeepSpeedCPUAdam under offload_optimizer; both JIT-compiled ops).

    The LR schedule goes in as a callable, which DeepSpeed applies to the basic optimizer (the one holding the
    param groups and Adam state) once it has built and wrapped it: one path for both optimizers. A LambdaLR over
    the optimizer `initialize` returns fails for DeepSpeed's wrappers ("DeepSpeedZeroOptimizer is not an Optimizer").
    """
    import deepspeed

    ds_config = build_ds_config(cfg) if ds_config is None else ds_config  # the trainer passes the one it checked
    optimizer = None
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay)
    schedule = lr_lambda(cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda basic: torch.optim.lr_scheduler.LambdaLR(basic, schedule))
    _undo_construction_step(engine)
    return engine, optimizer, scheduler


def _undo_construction_step(engine) -> None:
    """Stage 0 with bf16/fp16 weights: DeepSpeed's FP16 wrappers (0.19.8) build Adam's state by taking one optimizer
    step with zero gradients at construction. Adam's first real step was then its second (bias correction of step 2:
    about 0.74 of the first update), and the step's weight decay had already shrunk the fp32 masters but not the
    weights the model computes with. Put the masters back to those weights (they were copied from them) and let Adam
    start afresh, as every other layout does."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return
    masters, lowp, _ = _layout(engine.optimizer)
    with torch.no_grad():
        for m, lp in zip(masters, lowp):
            m.copy_(lp.detach().float())
    reset_optimizer_state(engine)


# ---------------------------------------------------------------------------------------------------------------
# This rank's fp32 master partition, and swapping other weights (the EMA) into the model for teacher passes.
# ---------------------------------------------------------------------------------------------------------------

def _layout(opt):
    """(fp32 masters, low-precision copies the model computes with or None, sync) for DeepSpeed's optimizer wrappers.

    - ZeRO-3: flat fp32 partition per group; the model's shards are views of `fp16_partitioned_groups_flat`.
    - ZeRO-1/2 and the BF16 optimizer: flat fp32 partition per group; `update_lp_params` re-gathers the model weights.
    - stage 0 with bf16/fp16 (FP16 optimizers): fp32 copies per parameter (or flat), model weights in `fp16_groups`.
    - stage 0 fp32: the parameters are their own masters.
    The same holds whichever optimizer steps the masters (torch AdamW, FusedAdam, DeepSpeedCPUAdam).
    """
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return list(opt.fp32_partitioned_groups_flat), list(opt.fp16_partitioned_groups_flat), None
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(opt, name):
            return list(getattr(opt, name)), None, opt.update_lp_params
    if hasattr(opt, "fp32_groups_flat") and hasattr(opt, "fp16_groups_flat"):
        return list(opt.fp32_groups_flat), list(opt.fp16_groups_flat), None
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        return [p for g in opt.fp32_groups for p in g], [p for g in opt.fp16_groups for p in g], None
    return [p for g in opt.param_groups for p in g["params"]], None, None


def _regathered(opt) -> list[torch.Tensor]:
    """ZeRO-1/2 and the BF16 optimizer: the flat low-precision buffers `update_lp_params` writes the masters into."""
    for name in ("bit16_groups_flat", "bf16_groups_flat"):
        if hasattr(opt, name):
            return list(getattr(opt, name))
    return []


def master_partitions(engine) -> list[torch.Tensor]:
    """The fp32 master weights this rank owns (what the EMA tracks), in the optimizer's own layout."""
    return _layout(engine.optimizer)[0]


@contextlib.contextmanager
def _device_ordered():
    """Synchronise the accelerator before and after a write into the weights the model computes with.

    Our copies run on the current (default) stream, while ZeRO-3 all-gathers and prefetches read the shards on
    DeepSpeed's own stream (ZeRO-1/2 re-gather on theirs). The sync before lets every gather or prefetch still
    reading the shards finish before they are overwritten; the sync after makes the new values complete before a
    later gather on another stream reads them. A device-wide sync, not an event on one stream, because prefetches
    DeepSpeed launched are not ours to wait on. Twice per swap enter and exit: negligible next to a forward.
    """
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()
    yield
    get_accelerator().synchronize()


STAGING_ELEMENTS = 1 << 26  # a piece of a host -> device copy with a dtype change: 256 MiB of fp32 on the device


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)`; from another device with another dtype (fp32 masters or EMA in host memory under
    offload_optimizer -> the bf16 shards on the GPU), piece by piece, each converted on `dst`'s device.

    torch converts such a copy on the host when it is blocking (a whole-size bf16 temporary in host memory, 5 GiB per
    rank for Qwen-Image over 8 GPUs, converted there, then sent from pageable memory) and on the device when it is
    not (a whole-size fp32 temporary there, 10 GiB). A piece goes over as it is (asynchronously from pinned memory)
    and is cast into `dst` on its device, in stream order: at most `STAGING_ELEMENTS` elements staged."""
    if dst.device == src.device or dst.dtype == src.dtype or dst.numel() <= STAGING_ELEMENTS:
        dst.copy_(src)
    else:
        copy_in_pieces(dst, src, STAGING_ELEMENTS)


def copy_in_pieces(dst: torch.Tensor, src: torch.Tensor, piece: int) -> None:
    d, s = dst.view(-1), src.reshape(-1)
    if d.numel() != s.numel():
        raise ValueError(f"copy_in_pieces: {d.numel()} elements from {s.numel()}")
    for start in range(0, d.numel(), piece):
        d[start:start + piece].copy_(s[start:start + piece].to(d.device, non_blocking=s.is_pinned()))


def _storages(tensors) -> set:
    return {(t.device, t.untyped_storage().data_ptr()) for t in tensors if t.untyped_storage().nbytes() > 0}


def _check_no_alias(targets: list[torch.Tensor], masters: list[torch.Tensor], replacement: list[torch.Tensor]):
    """The swap writes the replacement into `targets` and later the masters back. A target sharing storage with a
    master (DeepSpeed drops the separate fp32 copy when the model's own weights are fp32 on the optimizer's device)
    would lose the master for good; one sharing storage with the replacement would be written from itself."""
    for what, protected in (("a fp32 master partition", _storages(masters)),
                            ("the replacement weights", _storages(replacement))):
        for i, t in enumerate(targets):
            if t.untyped_storage().nbytes() > 0 and (t.device, t.untyped_storage().data_ptr()) in protected:
                raise RuntimeError(
                    f"weights_swapped_in: the model's weight buffer {i} ({t.dtype}, {tuple(t.shape)}, {t.device}) "
                    f"shares storage with {what}; swapping would overwrite it. Refusing instead of corrupting the "
                    "fp32 masters (a DeepSpeed optimizer layout fewstep does not support)")


@contextlib.contextmanager
def weights_swapped_in(engine, replacement: list[torch.Tensor]):
    """Run the model with `replacement` (same layout as `master_partitions`) as its trained weights, then restore.

    No full-model copy is made and nothing moves to the CPU (with offload_optimizer, the replacement and the masters
    come from host memory in pieces: `copy_into`): where the model computes with low-precision copies (ZeRO-3
    shards, stage-0 bf16), the replacement is written into them and the masters written back afterwards (bit-exact:
    DeepSpeed derives those copies from the masters the same way after every step); ZeRO-1/2 swap the fp32
    partition's storage and re-gather the model weights with DeepSpeed's own `update_lp_params`; plain fp32 swaps
    parameter storage. Autograd graphs built before the swap stay valid as long as backward runs after it. Every
    write is bracketed by accelerator syncs (`_device_ordered`) and refused if it would reach a master.
    """
    masters, lowp, sync = _layout(engine.optimizer)
    if lowp is not None:
        _check_no_alias(lowp, masters, replacement)
        with torch.no_grad(), _device_ordered():
            for lp, new in zip(lowp, replacement):
                copy_into(lp.data, new)  # casts in place, or piecewise from host memory
        try:
            yield
        finally:
            with torch.no_grad(), _device_ordered():
                for lp, master in zip(lowp, masters):
                    copy_into(lp.data, master)
        return
    _check_no_alias(_regathered(engine.optimizer), masters, replacement)
    saved = [m.data for m in masters]
    with _device_ordered():
        for m, new in zip(masters, replacement):
            m.data = new
        if sync is not None:
            sync()
    try:
        yield
    finally:
        with _device_ordered():
            for m, old in zip(masters, saved):
                m.data = old
            if sync is not None:
                sync()


@torch.no_grad()
def load_master(engine, tensors: list[torch.Tensor]) -> None:
    """Overwrite this rank's fp32 masters and propagate them to the weights the model computes with.

    Collective under ZeRO-3: like DeepSpeed's own checkpoint load, every parameter goes back to its partition first
    and the "persistent" ones (small parameters kept gathered in full when the persistence threshold is not 0) are
    re-gathered from their new shards afterwards; otherwise they would keep their old values until the next step.
    """
    opt = engine.optimizer
    masters, lowp, sync = _layout(opt)
    if hasattr(opt, "checkpoint_event_prologue"):
        opt.checkpoint_event_prologue()
    with _device_ordered():
        for m, t in zip(masters, tensors):
            m.copy_(t)
        if lowp is not None:
            for lp, m in zip(lowp, masters):
                lp.data.copy_(m.to(lp.device, lp.dtype))
        elif sync is not None:
            sync()
    if hasattr(opt, "checkpoint_event_epilogue"):
        opt.checkpoint_event_epilogue()


def inner_optimizer(engine):
    """The torch optimizer doing the Adam maths: the ZeRO wrapper's `.optimizer` (torch AdamW, FusedAdam,
    DeepSpeedCPUAdam), or the engine's optimizer itself without a wrapper. (ZeRO-3's partial offload would add a
    `backup_optimizer`: refused, `ds_config_checks._check_offload`.)"""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def replay_adam_bias_correction(engine) -> None:
    """After a resume, give DeepSpeed's CPU Adam op the beta**step a straight run has, so the next step is bit-exact.

    The op (DeepSpeedCPUAdam's, and FusedAdam's on the CPU accelerator, built on the same code) caches beta1**step
    and beta2**step in fp32 and multiplies them by beta at each consecutive step; given any other step (the first
    one after a resume, in a fresh process) it recomputes them with std::pow, which differs from the running product
    in the last bits (and more after many steps). Calling the op for steps 1..k on a one-element dummy, group by
    group as `step()` does, leaves exactly the running product; the dummy's update is discarded (about 2 us per step
    on CPU: 2 s after a million steps).
    torch AdamW and FusedAdam's CUDA op compute the correction from the step count alone: nothing to do.
    """
    opt = inner_optimizer(engine)
    update = _cpu_adam_op(opt)
    steps = [int(st["step"]) for st in opt.state.values() if "step" in st]
    if update is None or not steps:
        return
    p, g, m, v = (torch.zeros(1) for _ in range(4))
    for step in range(1, max(steps) + 1):
        for group in opt.param_groups:
            update(step, group, p, g, m, v)


def _cpu_adam_op(opt):
    """update(step, group, p, g, m, v): one call of the optimizer's CPU Adam op, for the optimizers that step with
    it (DeepSpeedCPUAdam; FusedAdam on the CPU accelerator); None for the others."""
    op = getattr(opt, "ds_opt_adam", None)
    if op is not None and hasattr(op, "adam_update") and hasattr(opt, "opt_id"):
        def update(step, group, p, g, m, v):
            op.adam_update(opt.opt_id, step, group["lr"], *group["betas"], group["eps"], group["weight_decay"],
                           group["bias_correction"], p, g, m, v)
        return update
    from deepspeed.accelerator import get_accelerator

    fused = getattr(opt, "multi_tensor_adam", None)
    if fused is None or not hasattr(opt, "adam_w_mode") or get_accelerator().device_name() != "cpu":
        return None
    from deepspeed.ops.adam.fused_adam import multi_tensor_applier

    def update(step, group, p, g, m, v):  # as FusedAdam.step() calls it
        multi_tensor_applier(fused, opt._dummy_overflow_buf, [[g], [p], [m], [v]], group["lr"], *group["betas"],
                             group["eps"], step, opt.adam_w_mode, int(bool(group["bias_correction"])),
                             group["weight_decay"])
    return update


def reset_optimizer_state(engine) -> None:
    """Restart Adam: moments and step counts are re-created lazily at the next step, as after `initialize`.

    Step counters: torch AdamW and DeepSpeedCPUAdam keep theirs in `state[p]["step"]`; FusedAdam seeds a new state's
    step from `param_group["step"]` (where a ZeRO-1/2 checkpoint restores it), so that is zeroed too. The
    DeepSpeedCPUAdam C++ op caches beta**step but recomputes it whenever the step it is given is neither its last
    nor last + 1, so a step restarting at 1 gets the first step's bias correction (swap_worker checks all three).
    """
    opt = inner_optimizer(engine)
    opt.state.clear()
    for group in opt.param_groups:
        if "step" in group:
            group["step"] = 0
