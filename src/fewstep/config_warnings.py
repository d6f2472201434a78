"""Settings a run accepts but that cannot act as written: each gets one warning line at start-up (rank 0), where an
error would refuse a config that trains correctly (a SimpleTuner config carries some of them by habit)."""
from __future__ import annotations

LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "lora_init_type")


def config_warnings(cfg) -> list[str]:
    """The warnings for `cfg` (a validated fewstep.config.Config): how its SimpleTuner options were read
    (`fewstep.config_simpletuner`), then the rest in the order of its options."""
    from fewstep.config import DIFFUSION_FAMILIES, FIELDS, _default

    out = list(getattr(cfg, "simpletuner_notes", []))
    if cfg.model_type == "full":
        defaults = {k: _default(FIELDS[k]) for k in LORA_KEYS}
        defaults["lora_alpha"] = float(cfg.lora_rank)  # its default: equal to lora_rank (set by validation)
        changed = [k for k in LORA_KEYS if getattr(cfg, k) != defaults[k]]
        if changed:
            out.append(f"{', '.join(changed)} not used: model_type full trains every weight of the denoiser")
    if cfg.diff2flow_enabled and cfg.model_family not in DIFFUSION_FAMILIES:
        out.append(f"diff2flow_enabled has no effect on model_family {cfg.model_family}: it is a flow-matching model "
                   f"already (diff2flow bridges {', '.join(DIFFUSION_FAMILIES)})")
    ignored = {k: getattr(cfg, k) for k in ("validation_guidance", "validation_guidance_real")
               if (getattr(cfg, k) or 0.0) > 1.0}
    if cfg.resolved_method == "twinflow" and ignored:
        out.append(f"{', '.join(f'{k} {v:g}' for k, v in ignored.items())} not used: TwinFlow samples without "
                   "classifier-free guidance (its target distils it), at the training guidance value")
    unused = [k for k in ("lr_end", "lr_power") if getattr(cfg, k) != _default(FIELDS[k])]
    if unused and cfg.lr_scheduler != "polynomial":
        out.append(f"{', '.join(unused)} not used: lr_scheduler {cfg.lr_scheduler} "
                   f"{'decays to 0' if cfg.lr_scheduler in ('linear', 'cosine') else 'keeps learning_rate'} "
                   "(only polynomial decays to lr_end, with power lr_power)")
    out += deepspeed_config_warnings(cfg)
    if 0 < cfg.max_train_steps <= cfg.lr_warmup_steps:
        per = " per Glance phase" if cfg.resolved_method == "glance" else ""
        out.append(f"lr_warmup_steps {cfg.lr_warmup_steps} >= max_train_steps {cfg.max_train_steps}{per}: the "
                   f"learning rate never reaches learning_rate {cfg.learning_rate:g}")
    return out


def deepspeed_config_warnings(cfg) -> list[str]:
    """How a `deepspeed_config` written for SimpleTuner (or accelerate) is read: its optimizer section is used; its
    scheduler section (fewstep passes DeepSpeed its own LR schedule) and batch sizes (fewstep's options are the only
    ones) are not, and below ZeRO-3 DeepSpeed ignores a parameter offload."""
    from fewstep.config import zero_stage_in_use
    from fewstep.engine.ds_config_checks import (KNOWN_KEYS, describe, offload_device, read_user_config,
                                                 used_offload_device)

    user, name, out = read_user_config(cfg.deepspeed_config), describe(cfg.deepspeed_config), []
    unknown = [k for k in user if k not in KNOWN_KEYS]  # (a near-miss of a known key is refused as a typo)
    if unknown:
        out.append(f"{name}: {', '.join(repr(k) for k in unknown)} not used: not a DeepSpeed option (DeepSpeed "
                   "ignores keys it does not know)")
    if "optimizer" in user:
        replaced = getattr(cfg, "deepspeed_optimizer_replaced", [])
        out.append(f"{name}: its optimizer section is the optimizer, as in SimpleTuner: DeepSpeed's AdamW "
                   f"(optimizer deepspeed) with learning_rate {cfg.learning_rate:g}, betas ({cfg.adam_beta1:g}, "
                   f"{cfg.adam_beta2:g}), eps {cfg.adam_epsilon:g}, weight_decay {cfg.adam_weight_decay:g}"
                   + (f"; its values replace the config's ({', '.join(replaced)})" if replaced else ""))
    zero = {**(user.get("zero_optimization") or {}), "stage": zero_stage_in_use(cfg.zero_stage, user)}
    if cfg.offload_param_path:
        out.append(f"offload_param_path {cfg.offload_param_path} not used: fewstep offloads to the CPU only, never "
                   "to an NVMe drive")
    if "scheduler" in user:
        kind = user["scheduler"].get("type", "?") if isinstance(user["scheduler"], dict) else user["scheduler"]
        out.append(f"{name}: its scheduler section ({kind}) is not used: the learning rate follows lr_scheduler "
                   f"{cfg.lr_scheduler} with lr_warmup_steps {cfg.lr_warmup_steps} (fewstep passes DeepSpeed its "
                   "own schedule, and DeepSpeed then ignores the section)")
    for key, option in (("train_micro_batch_size_per_gpu", "train_batch_size"),
                        ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        if key in user and user[key] != getattr(cfg, option):
            out.append(f"{name}: {key} {user[key]} is not used: the run's is {option} {getattr(cfg, option)} "
                       "(fewstep's batch options are the only ones; set it there)")
    if "train_batch_size" in user:
        out.append(f"{name}: train_batch_size {user['train_batch_size']} is not used: the global batch is "
                   "train_batch_size (per GPU) x gradient_accumulation_steps x GPUs of the fewstep config")
    if offload_device(zero, "offload_param") != "none" and used_offload_device(zero, "offload_param") == "none":
        out.append(f"{name}: zero_optimization.offload_param is not used at ZeRO stage {zero['stage']}: DeepSpeed "
                   "offloads parameters at stage 3 only")
    return out
