"""The config's cross-field checks (`Config.validate`): each option alone was checked when it was read
(`fewstep.config_values.coerce`); here, what options say together, with the lists and sizes parsed, all before any
model is loaded. A mistake raises ConfigError naming the keys and what to do."""
from __future__ import annotations

import dataclasses
import json

from fewstep import lora_formats, metrics
from fewstep.config import DIFFUSION_FAMILIES, FIELDS, _default, stage_set_by, zero_stage_in_use
from fewstep.config_values import coerce
from fewstep.engine.ds_config_checks import describe, inline_object, optimizer_settings, read_user_config
from fewstep.errors import ConfigError
from fewstep.methods.glance import TimestepListError, glance_schedule, parse_custom_timesteps
from fewstep.validation_settings import library_prompts, validation_size


def _check_resolution(cfg) -> None:
    """The config's resolution, in the units of its resolution_type (the data entries check theirs likewise; without
    a data config, plan.py plans at it as pixels unless its type says otherwise)."""
    from fewstep.data.backends import resolution_fits

    kind = cfg.resolution_type or (None if cfg.data_backend_config else "pixel")
    r = cfg.resolution
    if r is None or kind is None or resolution_fits(r, kind):  # no type: each entry that takes it checks it
        return
    if kind == "area":
        raise ConfigError(f"'resolution' is in megapixels with resolution_type 'area' (e.g. 1.0), got {r:g}")
    default = "" if cfg.resolution_type else " (the default)"
    raise ConfigError(f"'resolution' is in pixels with resolution_type '{kind}'{default}: "
                      f"{'an integer' if kind == 'pixel' else 'a number'} >= 8, got {r:g}")


def _read_deepspeed_config(cfg) -> dict:
    """The user's DeepSpeed config (`deepspeed_config`; JSON text becomes the object). Its optimizer section, as in
    SimpleTuner, is the optimizer DeepSpeed builds: its params set learning_rate, adam_beta1/2, adam_epsilon and
    adam_weight_decay, and `optimizer` becomes deepspeed (`config_warnings` says so)."""
    cfg.deepspeed_config = inline_object(cfg.deepspeed_config)
    user_ds = read_user_config(cfg.deepspeed_config)
    name, replaced = describe(cfg.deepspeed_config), []
    for option, value in optimizer_settings(user_ds, name).items():
        try:
            value = coerce(option, FIELDS[option], value)
        except ConfigError as e:
            raise ConfigError(f"{e} (from the optimizer section of {name})") from None
        if getattr(cfg, option) not in (value, _default(FIELDS[option])):
            replaced.append(f"{option} {getattr(cfg, option):g} -> {value:g}")
        setattr(cfg, option, value)
    cfg.deepspeed_optimizer_replaced = replaced  # said by config_warnings (not an option: not a field)
    if "optimizer" in user_ds:
        cfg.optimizer = "deepspeed"
    return user_ds


def validate(cfg):
    """Check `cfg` (a fewstep.config.Config) as a whole, completing it in place (lora_alpha's default, lists from
    comma strings, the validation size as WIDTHxHEIGHT); returns it."""
    for key in ("model_family", "pretrained_model_name_or_path"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"'{key}' is required")
    for key in ("pretrained_model_name_or_path", "output_dir", "data_backend_config", "cache_dir", "logging_dir",
                "deepspeed_config"):
        if isinstance(getattr(cfg, key), str) and not getattr(cfg, key).strip():
            needed = key in ("pretrained_model_name_or_path", "output_dir")
            raise ConfigError(f"'{key}' is empty: give a path" + ("" if needed else " or leave it out"))
    user_ds = _read_deepspeed_config(cfg)
    if cfg.lora_alpha is None:
        cfg.lora_alpha = float(cfg.lora_rank)
    _check_resolution(cfg)
    if isinstance(cfg.lora_targets, str):
        cfg.lora_targets = cfg.lora_targets.split(",")
    if cfg.lora_targets is not None:  # "to_q, to_k" (a list from the command line keeps the spaces)
        cfg.lora_targets = [x.strip() for x in map(str, cfg.lora_targets) if x.strip()]
    try:
        size = validation_size(cfg.validation_resolution)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg.validation_resolution = None if size is None else "{}x{}".format(*size)
    try:
        library_prompts(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.lr_scheduler == "polynomial" and not cfg.lr_end < cfg.learning_rate:
        raise ConfigError(f"'lr_end' {cfg.lr_end:g} must be below learning_rate {cfg.learning_rate:g}: the "
                          "polynomial schedule decays from learning_rate to lr_end")
    if cfg.grad_clip_method == "value" and user_ds.get("gradient_clipping"):
        raise ConfigError(f"{describe(cfg.deepspeed_config)} sets gradient_clipping (a global-norm clip) "
                          "while grad_clip_method is 'value' (each value clipped to max_grad_norm; SimpleTuner's "
                          "default, which a config in its spelling gets): set grad_clip_method norm, or remove "
                          "gradient_clipping")
    stage = zero_stage_in_use(cfg.zero_stage, user_ds)
    where = f"ZeRO stage {stage} from {describe(cfg.deepspeed_config)}" if stage_set_by(user_ds) \
        else f"zero_stage {stage}"
    if cfg.offload_optimizer and stage == 0:
        raise ConfigError(f"'offload_optimizer' (ZeRO-Offload) needs zero_stage 1, 2 or 3 (got {where})")
    if cfg.offload_param and stage != 3:
        raise ConfigError(f"'offload_param' needs zero_stage 3 (got {where})")
    try:  # "0,0.8" on the command line arrives as strings
        bounds = [float(x) for x in cfg.twinflow_enhanced_range]
    except (TypeError, ValueError):
        bounds = []
    if len(bounds) != 2 or not (0.0 <= bounds[0] < bounds[1] <= 1.0):
        raise ConfigError(f"'twinflow_enhanced_range' must be [lo, hi] with 0 <= lo < hi <= 1, got "
                          f"{cfg.twinflow_enhanced_range}")
    cfg.twinflow_enhanced_range = bounds
    w = [int(x) if isinstance(x, str) and x.strip().isdigit() else x for x in cfg.twinflow_group_weights]
    cfg.twinflow_group_weights = w  # "2,1,1,1" on the command line arrives as strings
    if len(w) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in w):
        raise ConfigError(f"'twinflow_group_weights' must be 4 positive integers (e2e, mul, any, adv), got {w}")
    if isinstance(cfg.flow_custom_timesteps, str) and not cfg.flow_custom_timesteps.strip():
        cfg.flow_custom_timesteps = None  # SimpleTuner's "" is no list: normal timestep sampling
    method = cfg.resolved_method
    if method == "twinflow":
        cfg.twinflow_enabled = True
        _twinflow(cfg)
    elif cfg.twinflow_enabled:
        raise ConfigError(f"'twinflow_enabled' is true but method is '{method}'")
    if method == "glance":
        if cfg.glance_slow_timesteps is None or cfg.glance_fast_timesteps is None:
            raise ConfigError("method 'glance' needs 'glance_slow_timesteps' and 'glance_fast_timesteps'")
        if cfg.model_type != "lora":
            raise ConfigError("method 'glance' trains LoRAs: set model_type 'lora'")
    if method == "flow" and cfg.flow_custom_timesteps is not None and cfg.model_type != "lora":
        raise ConfigError("'flow_custom_timesteps' with model_type 'full': a listed-timestep run is sampled with "
                          "the base model at the steps off its list (its LoRA switched off), which a full "
                          "fine-tune does not keep; set model_type 'lora'")
    unused = {"glance": ("flow_custom_timesteps",), "flow": ("glance_slow_timesteps", "glance_fast_timesteps"),
              "twinflow": ("glance_slow_timesteps", "glance_fast_timesteps")}[method]
    for key in (k for k in unused if getattr(cfg, k) is not None):
        lists = ("'glance_slow_timesteps' and 'glance_fast_timesteps'" if method == "glance" else
                 "'flow_custom_timesteps' (or nothing)")
        raise ConfigError(f"'{key}' is not used by method '{method}', which trains on {lists}: remove it, or "
                          "set the method that uses it")
    _prediction_type(cfg, method)
    changed = [f.name for f in dataclasses.fields(cfg) if f.name.startswith("twinflow_")
               and getattr(cfg, f.name) != _default(f)]
    if method != "twinflow" and changed:  # a seed's TwinFlow block without twinflow_enabled: plain training
        raise ConfigError(f"{', '.join(repr(k) for k in changed)} set, but TwinFlow is off (method '{method}'): "
                          f"set twinflow_enabled true, or remove {'them' if changed[1:] else 'it'}")
    cfg.lora_export_formats = lora_formats.normalize_formats(cfg.lora_export_formats)
    for problem in (lora_formats.formats_problem(cfg.lora_export_formats, cfg.model_type, cfg.model_family),
                    metrics.report_to_problem(cfg.report_to)):
        if problem:
            raise ConfigError(problem)
    # Parse custom timesteps now, so a typo fails before compute
    try:
        lists = {key: parse_custom_timesteps(getattr(cfg, key), key=key)
                 for key in ("flow_custom_timesteps", "glance_slow_timesteps", "glance_fast_timesteps")
                 if getattr(cfg, key) is not None}
    except TimestepListError as e:
        raise ConfigError(str(e)) from None
    if method == "glance":  # the sampling schedule Slow + Fast, built after the Slow phase's training
        try:
            glance_schedule(lists["glance_slow_timesteps"], lists["glance_fast_timesteps"])
        except TimestepListError as e:
            raise ConfigError(f"glance_slow_timesteps, glance_fast_timesteps: {e}") from None
    return cfg


def _prediction_type(cfg, method: str) -> None:
    diffusion_base = cfg.model_family in DIFFUSION_FAMILIES
    diff2flow = {"prediction_type": "epsilon", "diff2flow_enabled": True, "twinflow_allow_diff2flow": True}
    if diffusion_base and method != "twinflow":
        raise ConfigError(f"model_family '{cfg.model_family}' trains with method 'twinflow' (through "
                          f"diff2flow), not '{method}'")
    if diffusion_base and cfg.prediction_type == "flow_matching":
        raise ConfigError(f"model_family '{cfg.model_family}' is a diffusion model (epsilon or v prediction): "
                          f"fewstep trains it with TwinFlow through diff2flow; add {json.dumps(diff2flow)} "
                          "('v_prediction' for a v model)")
    if not diffusion_base and cfg.prediction_type != "flow_matching":
        raise ConfigError(f"prediction_type '{cfg.prediction_type}' (diff2flow) is for diffusion bases "
                          f"(model_family {', '.join(DIFFUSION_FAMILIES)}); model_family '{cfg.model_family}' "
                          "is a flow-matching model: remove prediction_type or set it to 'flow_matching'")

def _twinflow(cfg) -> None:
    if cfg.distillation_method is not None:
        raise ConfigError("TwinFlow requires 'distillation_method' to be null")
    if cfg.prediction_type != "flow_matching" and not (cfg.diff2flow_enabled and cfg.twinflow_allow_diff2flow):
        raise ConfigError(f"TwinFlow needs prediction_type 'flow_matching' (got '{cfg.prediction_type}'), unless "
                          "'diff2flow_enabled' and 'twinflow_allow_diff2flow' are both true")
    if not cfg.use_ema and cfg.twinflow_require_ema and not cfg.twinflow_allow_no_ema_teacher:
        raise ConfigError("TwinFlow needs an EMA teacher: set 'use_ema': true, or accept the student as teacher "
                          "with 'twinflow_allow_no_ema_teacher': true (or 'twinflow_require_ema': false)")
    if cfg.flow_custom_timesteps is not None:
        raise ConfigError("'flow_custom_timesteps' cannot be combined with TwinFlow (it samples its own times)")
    frozen_teacher = cfg.use_ema and cfg.ema_decay >= 1.0
    if cfg.twinflow_enhanced_ratio >= 1.0 and not frozen_teacher:
        raise ConfigError(f"'twinflow_enhanced_ratio' {cfg.twinflow_enhanced_ratio} >= 1 with a teacher that "
                          "follows the student: the learnt guidance scale grows towards 1/(1 - r), without bound "
                          "for r >= 1; use r < 1, or a frozen teacher (ema_decay 1)")
