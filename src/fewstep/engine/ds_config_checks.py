"""A user's `deepspeed_config` file read and checked (`Config.validate`), and checks of the DeepSpeed config fewstep
generated and merged it into, before anything is built: a mistake there (a section that is not an object, a typo in
a section name, a ZeRO option DeepSpeed would reject after the model load, a precision section against
`mixed_precision`) or an option fewstep cannot honour ends in one ConfigError line.
"""
from __future__ import annotations

import copy
import difflib
import json

from fewstep.errors import ConfigError
from fewstep.jsonfile import load_json, parse_json_text

PERSISTENCE_DEFAULT = 100000  # DeepSpeed's stage3_param_persistence_threshold when the key is absent

# DeepSpeed's top-level config keys (0.19), to catch a misspelt one, which DeepSpeed ignores without a word
KNOWN_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "communication_data_type", "seq_parallel_communication_data_type", "sparse_gradients", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown",
    "dump_state", "memory_breakdown", "timers", "flops_profiler", "activation_checkpointing", "aio",
    "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "elasticity", "autotuning", "checkpoint",
    "data_types", "data_efficiency", "curriculum_learning", "compression_training", "pipeline", "sparse_attention",
    "weight_quantization", "hybrid_engine", "eigenvalue", "progressive_layer_drop", "compile", "tensor_parallel",
    "dataloader_drop_last", "disable_allgather", "nebula", "datastates_ckpt", "use_data_before_expert_parallelism",
    "graph_harvesting", "mics_shard_size", "mics_hierarchical_params_gather", "load_universal_checkpoint",
    "use_node_local_storage", "zero_quantized_weights", "quantize_training", "gradient_accumulation_dtype",
    "log_level", "disable_python_gc", "gradient_allreduce_op", "managed_gradient_accumulation", "expert_parallel",
    "sequence_parallel_size", "vocabulary_size",
)

# Sections fewstep generates and merges a user's file into key by key, and those it reads (the checks below).
# DeepSpeed reads each as an object too: given as anything else (`"checkpoint": null`, `"fp16": true`) one replaced
# fewstep's section or failed here or inside `deepspeed.initialize`, after the model load, with a traceback.
GENERATED_SECTIONS = ("zero_optimization", "bf16", "optimizer", "timers")
READ_SECTIONS = ("checkpoint", "fp16", "amp", "torch_autocast", "bfloat16")


def describe(value) -> str:
    """How messages name the `deepspeed_config` option's value: its file, or the object given inline."""
    return f"deepspeed_config {value}" if isinstance(value, str) else "deepspeed_config (the object in the config)"


def read_user_config(value) -> dict:
    """The user's DeepSpeed config ({} without one), with its sections above checked to be objects.

    `value` (the `deepspeed_config` option) is a JSON file's path, or the object itself: SimpleTuner's inline form
    in a config file, JSON text on the command line. A value "auto" (accelerate's "fill this in", in configs written
    for it) is dropped, key and all: fewstep's value stands where it generates one, else DeepSpeed's default."""
    if value is None:
        return {}
    value = inline_object(value)
    if isinstance(value, str):
        user = load_json(value, ConfigError, "deepspeed_config")
    elif isinstance(value, dict):
        user = copy.deepcopy(value)
    else:
        raise ConfigError(f"'deepspeed_config' expects a DeepSpeed JSON file's path or a JSON object, got "
                          f"{json.dumps(value)}")
    if not isinstance(user, dict):
        raise ConfigError(f"{describe(value)}: expected a JSON object (DeepSpeed's config keys)")
    for key in (k for k in GENERATED_SECTIONS + READ_SECTIONS if k in user and not isinstance(user[k], dict)):
        instead = "fewstep's" if key in GENERATED_SECTIONS else "DeepSpeed's default"
        raise ConfigError(f"{describe(value)}: '{key}' must be a JSON object (leave it out for {instead}), "
                          f"got {json.dumps(user[key])}")
    zero = user.get("zero_optimization") or {}
    for key in ("offload_param", "offload_optimizer"):  # read before DeepSpeed's own check of the section
        if key in zero and zero[key] is not None and not isinstance(zero[key], dict):
            raise ConfigError(f"{describe(value)}: zero_optimization.{key} must be a JSON object such as "
                              f"{{\"device\": \"cpu\"}}, got {json.dumps(zero[key])}")
    return _without_auto(user)


def inline_object(value):
    """The `deepspeed_config` option's value with JSON text (the command line's inline object) parsed; a path or an
    object as given."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        return parse_json_text(value, ConfigError, "deepspeed_config")
    return value


def _without_auto(section: dict) -> dict:
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in section.items() if v != "auto"}


def optimizer_settings(user: dict, source: str) -> dict:
    """fewstep's options set by the user's `optimizer` section (DeepSpeed builds the optimizer from it, as in
    SimpleTuner): {option: value} from its params lr, betas, eps and weight_decay. Only Adam(W) is trained."""
    section = user.get("optimizer")
    if section is None:
        return {}
    kind = section.get("type", "AdamW")
    if str(kind).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{source}: optimizer type {kind!r} is not supported: fewstep trains with AdamW (set type "
                          "AdamW, or remove the optimizer section for fewstep's)")
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: optimizer.params must be a JSON object, got {json.dumps(params)}")
    out = {option: params[key] for key, option in (("lr", "learning_rate"), ("eps", "adam_epsilon"),
                                                    ("weight_decay", "adam_weight_decay")) if key in params}
    if "betas" in params:
        betas = params["betas"]
        if not (isinstance(betas, list) and len(betas) == 2):
            raise ConfigError(f"{source}: optimizer.params.betas must be a list of two numbers, got "
                              f"{json.dumps(betas)}")
        out.update(adam_beta1=betas[0], adam_beta2=betas[1])
    return out


def check_merged(ds: dict, user: dict, source: str, *, bf16: bool, use_ema: bool) -> None:
    """All checks of the merged config `ds` (`user`: the user's file alone)."""
    _check_keys(user, source)
    _check_precision(ds, source, bf16)
    _check_zero_section(ds["zero_optimization"], source)
    _check_offload(ds["zero_optimization"], source)
    _check_checkpointing(ds, source)
    if use_ema:
        _check_ema_swap(ds["zero_optimization"], source)


def _check_keys(user: dict, source: str) -> None:
    for key in user:
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.85) if key not in KNOWN_KEYS else []
        if close:
            raise ConfigError(f"{source}: unknown key '{key}'; did you mean '{close[0]}'? (DeepSpeed would ignore it)")


def _check_precision(ds: dict, source: str, bf16: bool) -> None:
    """The precision is fewstep's `mixed_precision` (bf16 or fp32): the model is loaded in it before DeepSpeed sees
    the config, so a precision section of the file's own fails at the first step or trains another precision."""
    if bool((ds.get("bf16") or {}).get("enabled")) != bf16:
        raise ConfigError(f"{source}: bf16.enabled is {ds['bf16'].get('enabled')}, but mixed_precision is "
                          f"{'bf16' if bf16 else 'fp32'}: set the precision with mixed_precision (fewstep writes "
                          "DeepSpeed's bf16 section from it), and remove bf16 from the file")
    for key in ("fp16", "amp", "torch_autocast", "bfloat16"):  # bfloat16: DeepSpeed's old name of bf16
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            raise ConfigError(f"{source}: {key}.enabled is not supported: fewstep trains in bf16 or fp32, set by "
                              "mixed_precision; remove it")


def _check_zero_section(zero: dict, source: str) -> None:
    """DeepSpeed's own validation of the ZeRO section (it would run in `deepspeed.initialize`, after the model load)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    if zero.get("stage") not in (0, 1, 2, 3) or isinstance(zero.get("stage"), bool):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero.get('stage')!r}")
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f".{x}" for x in first["loc"])
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{source}: zero_optimization{where}: {first['msg']}, got {first.get('input')!r}"
                          f"{more}") from None


def offload_device(zero: dict, key: str):
    """The device a ZeRO section offloads `key` to ("none" when it does not)."""
    return (zero.get(key) or {}).get("device", "none")


def used_offload_device(zero: dict, key: str):
    """`offload_device`, where DeepSpeed uses the offload at the section's stage (parameters at stage 3, the
    optimizer at 1-3); "none" where it ignores it."""
    stage = zero.get("stage", 0)
    return offload_device(zero, key) if (stage == 3 if key == "offload_param" else stage >= 1) else "none"


# Why each NVMe offload is refused (DeepSpeed 0.19: a swapped-out partition is a 1-element placeholder in memory)
NVME_WHY = {
    "offload_param": "the partitioned load writes the pretrained weights into each rank's in-memory ZeRO-3 shards, "
                     "which DeepSpeed swaps out to placeholders (the weights would stay randomly initialised), and "
                     "the non-finite check before each save reads those shards",
    "offload_optimizer": "the non-finite check of every step reads the gradients and the EMA tracks the fp32 "
                         "masters, which DeepSpeed keeps on the drive",
}


def _check_offload(zero: dict, source: str) -> None:
    """ZeRO-Offload is a ZeRO feature: at stage 0 DeepSpeed ignores it for a torch AdamW, and with `optimizer:
    deepspeed` builds DeepSpeedCPUAdam over the parameters where they are (a CUDA parameter fails at the first step)."""
    if zero.get("stage", 0) == 0 and offload_device(zero, "offload_optimizer") != "none":
        raise ConfigError(f"{source}: 'offload_optimizer' (ZeRO-Offload) needs zero_stage 1, 2 or 3, got stage 0")
    for key in ("offload_param", "offload_optimizer"):
        if used_offload_device(zero, key) == "nvme":
            raise ConfigError(f"{source}: zero_optimization.{key}.device nvme (ZeRO-Infinity) is not supported: "
                              f"{NVME_WHY[key]}; use device cpu (`python launcher/plan.py` says what fits)")
    ratio = (zero.get("offload_optimizer") or {}).get("ratio", 1.0)
    if used_offload_device(zero, "offload_optimizer") != "none" and ratio < 1.0:  # stage 3 (DeepSpeed refuses 1, 2)
        # DeepSpeed 0.18's stage 3 steps the sub-groups it keeps on the GPU with a `backup_optimizer` whose first
        # param group is its own copy, made at start-up: the LR schedule never reaches it, nor does its state reach a
        # checkpoint (checked on the CPU: its lr stays the base value through the warm-up)
        raise ConfigError(f"{source}: zero_optimization.offload_optimizer.ratio {ratio} (a partial offload) is not "
                          "supported: DeepSpeed steps the part it keeps on the GPU with a second optimizer that the "
                          "LR schedule does not reach and checkpoints do not hold (its Adam state would restart at "
                          "each resume); use ratio 1 (the default: the whole optimizer on the CPU) or no "
                          "offload_optimizer")


def _check_checkpointing(ds: dict, source: str) -> None:
    """fewstep.checkpoint commits a checkpoint once every rank's files are written and fsynced, and reshards it
    itself. Refuse DeepSpeed options that change who writes what, or when: an asynchronous writer (`decoupled`,
    DataStates) returns before the files exist, a parallel `writer` leaves some ranks' files to others, node-local
    storage keeps shards off the shared checkpoint folder, and `load_universal` would read it as another layout."""
    ckpt = ds.get("checkpoint") or {}
    refused = [f"checkpoint.{k}" for k in ("writer", "use_node_local_storage", "load_universal") if ckpt.get(k)]
    if ds.get("datastates_ckpt") not in (None, False):
        refused.append("datastates_ckpt")
    if refused:
        raise ConfigError(f"{source}: {', '.join(refused)} is not supported: fewstep writes, commits (atomically, "
                          "after every rank's files are on disk) and reshards checkpoints itself; remove it")


def _check_ema_swap(zero: dict, source: str) -> None:
    """The EMA (export, TwinFlow's teacher) is swapped into the weights by `weights_swapped_in`, which writes this
    rank's ZeRO-3 shards and must read its fp32 masters. Refuse what keeps weights out of its reach (DeepSpeed 0.19):

    - persistent parameters (numel <= stage3_param_persistence_threshold, while the running total stays within
      stage3_model_persistence_threshold) stay gathered in full and are never re-gathered from their shard;
    - hpZ (zero_hpz_partition_size > 1): after a parameter's first gather in a step, later gathers (backward, a
      teacher pass after the student's) read its secondary copy `ds_secondary_tensor`, refreshed only after the
      optimizer step.

    (NVMe offload, which would keep the shards or the masters out of memory, is refused for every run:
    `_check_offload`.)

    zero_quantized_weights is fine: it quantizes the shard at every gather (frozen weights, which
    zero_quantized_nontrainable_weights keeps quantized, are never swapped).
    """
    why = "with use_ema the EMA weights are swapped into this rank's ZeRO-3 shards, and "
    if zero.get("stage") == 3:
        value = zero.get("stage3_param_persistence_threshold", PERSISTENCE_DEFAULT)
        if not _is_zero(value) and not _is_zero(zero.get("stage3_model_persistence_threshold")):
            raise ConfigError(f"{source}: zero_optimization.stage3_param_persistence_threshold is {value} (0 "
                              f"needed): {why}parameters below the threshold would persist gathered in full, so the "
                              "EMA teacher and the EMA export would silently run them with the live weights")
        hpz = zero.get("zero_hpz_partition_size", 1)
        if hpz not in (0, 1):
            raise ConfigError(f"{source}: zero_optimization.zero_hpz_partition_size is {hpz} (1 needed): {why}hpZ "
                              "gathers from a secondary copy of each parameter that the swap does not reach")


def _is_zero(value) -> bool:
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return False
