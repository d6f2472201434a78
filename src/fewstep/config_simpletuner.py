"""SimpleTuner's spelling of a config, read by fewstep.

A SimpleTuner config carries many keys besides the ones fewstep has (its own examples, 114 of them at the time of
writing, carry 50 that fewstep has no option for). Each such key is one of:

- `RENAMED`: SimpleTuner's other name of a fewstep option (`checkpoint_step_interval` and `validation_step_interval`,
  its newer names; `save_total_limit`, an older one it still reads);
  `lora_format` (one format) is read as `lora_export_formats` (diffusers' file, and that one);
- `VALUE_ALIASES`: a SimpleTuner value of a fewstep option that fewstep trains as another of its values;
- `ONE_VALUE`: a feature fewstep does not have, accepted at the value(s) where the config asks for what fewstep does
  anyway (mostly SimpleTuner's default, the feature off); any other value is refused, naming what fewstep does;
- `FLAVOURS`: `model_flavour`, SimpleTuner's short name of a family's base model, gives the hub id to load when
  `pretrained_model_name_or_path` is not set;
- `NO_EFFECT`: a setting that cannot change what fewstep trains (uploads, speed and memory knobs of SimpleTuner's own
  loaders, scores fewstep does not compute): accepted at any value, and listed in one start-up line.

A config with any of these keys is in SimpleTuner's spelling, and where it leaves gradient clipping unset it gets
SimpleTuner's defaults (`SIMPLETUNER_CLIPPING`: each value clipped to 2.0), not fewstep's (the global norm to 1.0).

A key in none of them is unknown, and fails with the closest fewstep option (`fewstep.config_values.closest_keys`).
"""
from __future__ import annotations

import json
from typing import Any

from fewstep.config_values import as_type

RENAMED = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
    "save_total_limit": "checkpoints_total_limit",
}

# option -> {SimpleTuner's value: fewstep's value, why}
VALUE_ALIASES = {
    "optimizer": {"adamw_bf16": ("adamw", "adamw_bf16 trains bf16 weights with stochastic rounding; fewstep's adamw "
                                          "keeps fp32 master weights under bf16 mixed precision, which needs no "
                                          "rounding trick")},
}

# model_family -> model_flavour -> hub id (SimpleTuner's names; "medium" and "large" are SD 3.5's)
FLAVOURS = {
    "flux": {"dev": "black-forest-labs/FLUX.1-dev", "krea": "black-forest-labs/FLUX.1-Krea-dev",
             "schnell": "black-forest-labs/FLUX.1-schnell"},
    "sd3": {"medium": "stabilityai/stable-diffusion-3.5-medium", "large": "stabilityai/stable-diffusion-3.5-large"},
    "qwen_image": {"v1.0": "Qwen/Qwen-Image", "v2.0": "Qwen/Qwen-Image-2512"},
    "sdxl": {"base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
             "base-0.9": "stabilityai/stable-diffusion-xl-base-0.9"},
}
UNSUPPORTED_FLAVOURS = {  # SimpleTuner flavours of these families that fewstep cannot train
    "kontext": "FLUX.1 Kontext is an image-editing model: image conditioning is not implemented",
    **{f: "Qwen-Image-Edit is an image-editing model: image conditioning is not implemented"
       for f in ("edit-v1", "edit-v2", "edit-v2+", "edit-v3")},
    "refiner-1.0": "the SDXL refiner is a second-stage model with one text encoder, which fewstep does not load",
    "refiner-0.9": "the SDXL refiner is a second-stage model with one text encoder, which fewstep does not load",
}

_NO_TREAD = "TREAD token routing is not implemented"
ONE_VALUE: dict[str, tuple[tuple, str]] = {  # key -> (values accepted, what fewstep does instead)
    "flow_use_beta_schedule": ((False,), "training times are logit-normal (flow_logit_mean, flow_logit_std) or "
                                         "uniform (flow_use_uniform_schedule); the beta schedule is not implemented"),
    "flow_beta_schedule_alpha": ((2.0,), "the beta schedule is not implemented"),
    "flow_beta_schedule_beta": ((2.0,), "the beta schedule is not implemented"),
    "flow_sigmoid_scale": ((1.0,), "the logit-normal schedule's spread is flow_logit_std"),
    "flux_fast_schedule": ((False,), "FLUX.1-schnell's fast schedule is not implemented"),
    "flux_guidance_mode": (("constant",), "FLUX's guidance input is flux_guidance_value, the same at every step"),
    "flux_attention_masked_training": ((False,), "masked text attention is not implemented"),
    "base_model_precision": (("no_change",), "the frozen base is loaded in the training dtype (mixed_precision); "
                                             "quantised bases (int8, fp8, nf4) are not supported"),
    **{f"text_encoder_{i}_precision": (("no_change",), "text encoders are loaded in the training dtype; quantised "
                                                       "encoders are not supported") for i in (1, 2, 3, 4)},
    "quantize_activations": ((False,), "nothing is quantised"),
    # SimpleTuner's TwinFlow guide: "disable scheduled sampling"
    "scheduled_sampling_max_step_offset": ((0,), "scheduled sampling is not implemented (training inputs are noised "
                                                 "data, as TwinFlow's guide asks)"),
    "scheduled_sampling_probability": ((0.0,), "scheduled sampling is not implemented"),
    "lora_type": (("standard",), "fewstep trains PEFT LoRA (lora_rank, lora_alpha, lora_targets, lora_init_type); "
                                 "LyCORIS is not supported"),
    "validation_lycoris_strength": ((1.0,), "LyCORIS is not supported"),
    "controlnet": ((False,), "ControlNet training is not implemented"),
    "tread_config": ((None,), _NO_TREAD),
    "validation_guidance_rescale": ((0.0,), "validation's guidance is not rescaled (Qwen-Image's keeps its "
                                            "pipeline's per-token norm rescale)"),
    "validation_guidance_skip_layers": ((None,), "skip-layer guidance is not implemented"),
    "validation_prompt_library": ((False,), "validation renders validation_prompt; SimpleTuner's built-in prompt "
                                            "library is not shipped"),
    "num_train_epochs": ((0, None), "fewstep counts training in optimizer steps: set max_train_steps (SimpleTuner's "
                                    "0 here means the same)"),
    "strict_epoch_limit": ((False,), "fewstep counts training in optimizer steps (max_train_steps)"),
    "ignore_final_epochs": ((False,), "fewstep counts training in optimizer steps (max_train_steps)"),
    "gradient_checkpointing_interval": ((None, 1), "gradient_checkpointing recomputes every block"),
    "ema_update_interval": ((None, 1), "the EMA is updated at every optimizer step"),
    "loss_type": (("l2",), "the flow-matching loss is the mean squared error"),
    "attention_mechanism": (("diffusers",), "attention is torch's scaled_dot_product_attention, through diffusers"),
    "fuse_qkv_projections": ((False,), "QKV projections are not fused"),
    "musubi_blocks_to_swap": ((0, None), "block swapping is not implemented; ZeRO-3 with offload_param keeps the "
                                         "weights in CPU memory instead"),
    "dynamo_backend": (("no", None), "the model is not compiled with torch.compile"),
    "aspect_bucket_rounding": ((2,), "aspect buckets are keyed by the aspect ratio rounded to 2 decimals"),
    "push_to_hub": ((False,), "fewstep does not upload: it exports the LoRA or model under output_dir (the "
                              "log names the folder), for `hf upload` or your own tool"),
    "push_checkpoints_to_hub": ((False,), "fewstep does not upload checkpoints"),
    "pretrained_vae_model_name_or_path": ((None, "madebyollin/sdxl-vae-fp16-fix"),
                                          "the VAE is the one in the vae/ folder of pretrained_model_name_or_path: "
                                          "put the VAE you want there (SDXL's fp16 fix, SimpleTuner's SDXL default, "
                                          "is accepted: fewstep runs the VAE in bf16 or fp32, where SDXL's own does "
                                          "not overflow)"),
    "gradient_checkpointing_backend": (("torch",), "gradient checkpointing is torch's (through diffusers)"),
    "delete_problematic_images": ((False,), "an image that does not decode is skipped with a line naming it; "
                                           "fewstep deletes nothing"),
    "context_parallel_size": ((1, None), "context parallelism is not implemented (ZeRO shards the model instead)"),
    "enable_group_offload": ((False,), "group offload is not implemented; ZeRO-3 with offload_param keeps the "
                                       "weights in CPU memory instead"),
}

NO_EFFECT = {  # key -> why it changes nothing here
    "hub_model_id": "fewstep makes no hub upload",
    "disable_benchmark": "fewstep renders no step-0 benchmark of the base model",
    "validation_torch_compile": "validation is not compiled",
    "quantize_via": "nothing is quantised",
    "vae_enable_tiling": "the cache fill encodes whole images",
    "vae_enable_slicing": "the cache fill encodes whole images",
    "vae_cache_ondemand": "the cache is filled before training starts",
    "compress_disk_cache": "the cache's file format is fewstep's own",
    "disable_bucket_pruning": "fewstep prunes no bucket: one smaller than the global batch is drawn in fewer rounds",
    "skip_file_discovery": "fewstep lists the image folders at every start",
    "offload_during_startup": "the cache fill loads only the text encoders and the VAE",
    "validation_disable_unconditional": "fewstep renders no unconditional validation image",
    "num_eval_images": "fewstep computes no evaluation scores",
    "eval_steps_interval": "fewstep computes no evaluation scores",
    "num_processes": "the launcher (deepspeed, torchrun or srun) sets the number of processes",
    "lycoris_config": "it configures lora_type lycoris, which is refused",
    "dataloader_prefetch": "batches come from the latent cache",
    "dataloader_prefetch_qlen": "batches come from the latent cache",
    "allow_dataset_oversubscription": "fewstep trains a data set of any size: a bucket smaller than the global "
                                      "batch wraps into its next epoch",
    **{k: "only with validation_guidance_skip_layers (skip-layer guidance), which is not implemented"
       for k in ("validation_guidance_skip_scale", "validation_guidance_skip_layers_start",
                 "validation_guidance_skip_layers_stop")},
    **{k: "only with enable_group_offload, which is not implemented"
       for k in ("group_offload_type", "group_offload_use_stream", "group_offload_blocks_per_group",
                 "group_offload_to_disk_path")},
}


def _accepted(value: Any, accepted: tuple) -> bool:
    for a in accepted:
        if a is None:
            if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
                return True
            continue
        try:
            if as_type(type(a).__name__, value) == a:
                return True
        except (ValueError, TypeError):
            pass
    return False


COMMAND_LINE = " on the command line"  # `source` of a command-line value (fewstep.config.load_config)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", ""))


def _same(a: Any, b: Any) -> bool:
    """Whether two spellings of one option's value agree (500 and "500.0" do; so do the format lists ["a", "b"] and
    "b, a": lora_format's, whose order means nothing)."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        def items(v):
            return sorted(str(x).strip().lower() for x in (v if isinstance(v, (list, tuple)) else str(v).split(",")))
        return items(a) == items(b)


def _merge(raw: dict, source: dict, old: str, new: str, value: Any, problems: list[str], given_as: dict,
           given: Any = None) -> None:
    """Give option `new` the value SimpleTuner's key `old` had (already removed from `raw`; `given`: as written, where
    `value` is its translation; `given_as[new]` is then `old`, for messages). Where both are given, a command-line
    value wins over the file's (as for any option); in one place they must agree."""
    where = source.pop(old)
    if new not in raw or (where == COMMAND_LINE and source[new] != COMMAND_LINE):
        raw[new], source[new], given_as[new] = value, where, old
    elif (where == COMMAND_LINE) == (source[new] == COMMAND_LINE) and not _same(raw[new], value):
        problems.append(f"'{old}'{where} ({value if given is None else given!r}) and '{new}'{source[new]} "
                        f"({raw[new]!r}) are one option "
                        "(SimpleTuner's name and fewstep's); keep one")


SIMPLETUNER_CLIPPING = {"grad_clip_method": "value", "max_grad_norm": 2.0}  # its defaults, where fewstep's differ
LORA_FORMATS = ("diffusers", "comfyui")  # SimpleTuner's choices of lora_format


def translate(raw: dict[str, Any], source: dict[str, str]) -> tuple[list[str], list[str], dict[str, str]]:
    """Rewrite `raw` (normalised key -> value; `source[key]`: where it was given) in place from SimpleTuner's spelling
    to fewstep's. Returns (notes, problems, given_as): the start-up notes (the options that have no effect here, the
    values read as another, SimpleTuner's defaults applied), every value fewstep cannot train as asked (for one error
    with the unknown keys), and the SimpleTuner name each renamed option was given under (for its value's errors)."""
    problems, notes, given_as = [], [], {}
    spelled = any(k in RENAMED or k in ONE_VALUE or k in NO_EFFECT or k in ("lora_format", "model_flavour")
                  for k in raw if source.get(k) != COMMAND_LINE)  # the config file's spelling, not an override's
    for old, new in RENAMED.items():
        if old in raw:
            value = raw.pop(old)
            if _is_null(value):  # SimpleTuner skips a null option: its default
                source.pop(old)
            else:
                _merge(raw, source, old, new, value, problems, given_as)
    if "lora_format" in raw:  # SimpleTuner writes one format; fewstep always writes diffusers', which it samples
        value = raw.pop("lora_format")
        if _is_null(value) or str(raw.get("model_type", "")).lower() == "full":  # SimpleTuner's full: no LoRA file
            source.pop("lora_format")
        elif str(value).lower() not in LORA_FORMATS:
            problems.append(f"'lora_format'{source.pop('lora_format')} is {value!r}: SimpleTuner's choices are "
                            f"{', '.join(LORA_FORMATS)}")
        else:
            formats = "diffusers" if str(value).lower() == "diffusers" else f"diffusers,{str(value).lower()}"
            _merge(raw, source, "lora_format", "lora_export_formats", formats, problems, given_as, value)
    if "model_flavour" in raw:
        _flavour(raw, source, notes, problems)
    for key, aliases in VALUE_ALIASES.items():
        value = raw.get(key)
        if isinstance(value, str) and value.lower() in aliases:
            raw[key], why = aliases[value.lower()]
            notes.append(f"{key} {value} trains as {raw[key]} ({why})")
    for key in [k for k in raw if k in ONE_VALUE]:
        accepted, instead = ONE_VALUE[key]
        value = raw.pop(key)
        if not _accepted(value, accepted):
            shown = " or ".join(json.dumps(a) for a in accepted)
            problems.append(f"'{key}'{source[key]} is {value!r}: fewstep takes only {shown} here (what it does "
                            f"anyway); {instead}")
    ignored = [k for k in raw if k in NO_EFFECT]
    if ignored:
        notes.append("SimpleTuner options with no effect in fewstep: " +
                     "; ".join(f"{k} ({NO_EFFECT[k]})" for k in ignored))
    for key in ignored:
        raw.pop(key)
    if spelled:
        _simpletuner_defaults(raw, source, notes)
    return notes, problems, given_as


def _simpletuner_defaults(raw: dict[str, Any], source: dict[str, str], notes: list[str]) -> None:
    """A config in SimpleTuner's spelling relies on SimpleTuner's defaults where they differ from fewstep's: its
    gradient clipping; and its `cosine` is not fewstep's, which it can only say."""
    unset = {k: v for k, v in SIMPLETUNER_CLIPPING.items() if k not in raw}
    if unset:
        raw.update(unset)
        source.update({k: " (SimpleTuner's default, for a config in its spelling)" for k in unset})
        how = "each gradient value to +-" if str(raw["grad_clip_method"]).lower() == "value" else "the global norm to "
        notes.append(f"{', '.join(f'{k} {v}' for k, v in unset.items())}: SimpleTuner's default for a config in its "
                     f"spelling, so training clips {how}{raw['max_grad_norm']} (fewstep's own default clips the "
                     "global norm to 1.0)")
    if str(raw.get("lr_scheduler", "")).lower() == "cosine":
        notes.append("lr_scheduler cosine decays once, from learning_rate after the warmup to 0 at the last step "
                     "(the cosine of diffusers and transformers); SimpleTuner's own cosine restarts every "
                     "lr_warmup_steps steps, down to lr_end")


def _flavour(raw: dict[str, Any], source: dict[str, str], notes: list[str], problems: list[str]) -> None:
    """Read `model_flavour` (removed from `raw`): the model to load where the config names none."""
    flavour, where = raw.pop("model_flavour"), source.pop("model_flavour")
    if _is_null(flavour):
        return
    family = str(raw.get("model_family", "")).lower()
    known = FLAVOURS.get(family)
    if known is None:  # no or an unknown family: its own error comes later
        return
    model = raw.get("pretrained_model_name_or_path")
    if not isinstance(flavour, str):
        problems.append(f"'model_flavour'{where} must be a name such as {next(iter(known))!r}, got {flavour!r}")
    elif model is not None:  # the model is named: the flavour says nothing more
        if flavour not in known or str(model).rstrip("/").lower() != known[flavour].lower():
            notes.append(f"model_flavour {flavour} not used: pretrained_model_name_or_path names the model ({model})")
    elif flavour in UNSUPPORTED_FLAVOURS:
        problems.append(f"'model_flavour'{where} is {flavour!r}: {UNSUPPORTED_FLAVOURS[flavour]}")
    elif flavour not in known:
        problems.append(f"'model_flavour'{where} is {flavour!r}: model_family {family} has the flavours "
                        f"{', '.join(known)}; or name any model with pretrained_model_name_or_path")
    else:
        raw["pretrained_model_name_or_path"] = known[flavour]
        source["pretrained_model_name_or_path"] = f" (model_flavour {flavour}{where})"
        notes.append(f"model_flavour {flavour}: loading {known[flavour]}")
