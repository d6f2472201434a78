"""DeepSpeed set-up: the generated ZeRO config, `deepspeed.initialize`, and access to this rank's fp32 master
partition (what the EMA tracks and what the EMA teacher is swapped into). The process group is set up by
`fewstep.engine.distributed`.
"""
from __future__ import annotations

import contextlib
import json
import math

import torch


def build_ds_config(cfg) -> dict:
    """The DeepSpeed config generated from fewstep's options; `deepspeed_config` entries override it."""
    zero = {"stage": cfg.zero_stage, "overlap_comm": torch.cuda.is_available(), "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if cfg.zero_stage == 3:
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
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer == "deepspeed":
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_epsilon,
            "weight_decay": cfg.adam_weight_decay}}
    if cfg.deepspeed_config:
        with open(cfg.deepspeed_config) as fh:
            user = json.load(fh)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            user.pop(key, None)  # fewstep's batch options are the single source of truth
        _deep_update(ds, user)
    return ds


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def lr_lambda(cfg):
    """Warmup then constant / linear decay / cosine decay, as a multiplier of the peak LR."""
    warm, total = cfg.lr_warmup_steps, max(cfg.max_train_steps, 1)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_scheduler in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_engine(cfg, model: torch.nn.Module, trainable: list[torch.nn.Parameter]):
    """`deepspeed.initialize` with a client torch AdamW (no JIT build) unless `optimizer: deepspeed` is asked for."""
    import deepspeed

    ds_config = build_ds_config(cfg)
    optimizer = None
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay)
    if optimizer is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable,
                                                               optimizer=optimizer, lr_scheduler=scheduler,
                                                               config=ds_config)
    else:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        engine.lr_scheduler = scheduler
    return engine, optimizer, scheduler


# ---------------------------------------------------------------------------------------------------------------
# This rank's fp32 master partition, and swapping other weights (the EMA) into the model for teacher passes.
# ---------------------------------------------------------------------------------------------------------------

def _layout(opt):
    """(fp32 masters, low-precision copies the model computes with or None, sync) for DeepSpeed's optimizer wrappers.

    - ZeRO-3: flat fp32 partition per group; the model's shards are views of `fp16_partitioned_groups_flat`.
    - ZeRO-1/2 and the BF16 optimizer: flat fp32 partition per group; `update_lp_params` re-gathers the model weights.
    - stage 0 with bf16/fp16 (FP16 optimizers): fp32 copies per parameter (or flat), model weights in `fp16_groups`.
    - stage 0 fp32: the parameters are their own masters.
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


def master_partitions(engine) -> list[torch.Tensor]:
    """The fp32 master weights this rank owns (what the EMA tracks), in the optimizer's own layout."""
    return _layout(engine.optimizer)[0]


@contextlib.contextmanager
def weights_swapped_in(engine, replacement: list[torch.Tensor]):
    """Run the model with `replacement` (same layout as `master_partitions`) as its trained weights, then restore.

    No full-model copy is made and nothing moves to the CPU: where the model computes with low-precision copies (ZeRO-3
    shards, stage-0 bf16), the replacement is written into them and the masters written back afterwards (bit-exact:
    DeepSpeed derives those copies from the masters the same way after every step); ZeRO-1/2 swap the fp32
    partition's storage and re-gather the model weights with DeepSpeed's own `update_lp_params`; plain fp32 swaps
    parameter storage. Autograd graphs built before the swap stay valid as long as backward runs after it.
    """
    masters, lowp, sync = _layout(engine.optimizer)
    if lowp is not None:
        with torch.no_grad():
            for lp, new in zip(lowp, replacement):
                lp.data.copy_(new.to(lp.device, lp.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for lp, master in zip(lowp, masters):
                    lp.data.copy_(master.to(lp.device, lp.dtype))
        return
    saved = [m.data for m in masters]
    for m, new in zip(masters, replacement):
        m.data = new
    if sync is not None:
        sync()
    try:
        yield
    finally:
        for m, old in zip(masters, saved):
            m.data = old
        if sync is not None:
            sync()


@torch.no_grad()
def load_master(engine, tensors: list[torch.Tensor]) -> None:
    """Overwrite this rank's fp32 masters and propagate them to the weights the model computes with."""
    masters, lowp, sync = _layout(engine.optimizer)
    for m, t in zip(masters, tensors):
        m.copy_(t)
    if lowp is not None:
        for lp, m in zip(lowp, masters):
            lp.data.copy_(m.to(lp.device, lp.dtype))
    elif sync is not None:
        sync()


def reset_optimizer_state(engine) -> None:
    """Forget Adam moments and step counts (the inner torch optimizer re-creates them lazily)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner.state.clear()
