import json

import pytest

from fewstep.config import FIELDS, ConfigError, load_config
from fewstep.config_values import normalize_key, parse_overrides

SEED_GLANCE = {  # the seed document's JSON, verbatim but for the model path
    "--model_type": "lora", "--model_family": "flux", "--pretrained_model_name_or_path": "tiny:flux",
    "--data_backend_config": "config/multidatabackend.json", "--train_batch_size": 1, "--max_train_steps": 60,
    "--lora_rank": 32, "--output_dir": "output/glance-slow",
    "--flow_custom_timesteps": "1000,979.1915,957.5157,934.9171,911.3354"}

SEED_TWINFLOW = {
    "model_family": "sd3", "model_type": "lora", "pretrained_model_name_or_path": "tiny:sd3",
    "output_dir": "output/sd3-twinflow", "distillation_method": None, "use_ema": True, "twinflow_enabled": True,
    "twinflow_target_step_count": 2, "twinflow_estimate_order": 2, "twinflow_enhanced_ratio": 0.5,
    "twinflow_delta_t": 0.01, "twinflow_target_clamp": 1.0, "learning_rate": 1e-4, "train_batch_size": 1,
    "gradient_accumulation_steps": 4, "mixed_precision": "bf16", "validation_guidance": 0.0,
    "validation_num_inference_steps": 2}


def merged(base, changes):
    """base with changes applied, whichever spelling (with or without '--') either uses for a key."""
    changed = {normalize_key(k) for k in changes}
    return {**{k: v for k, v in base.items() if normalize_key(k) not in changed}, **changes}


def write(tmp_path, data):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_seed_glance_config_parses_with_dashes(tmp_path):
    cfg = load_config(write(tmp_path, SEED_GLANCE))
    assert cfg.model_family == "flux" and cfg.lora_rank == 32 and cfg.max_train_steps == 60
    assert cfg.lora_alpha == 32.0  # defaults to the rank
    assert cfg.resolved_method == "flow"


def test_seed_twinflow_config_parses_and_sets_method(tmp_path):
    cfg = load_config(write(tmp_path, SEED_TWINFLOW))
    assert cfg.resolved_method == "twinflow" and cfg.twinflow_target_step_count == 2 and cfg.use_ema
    assert cfg.twinflow_adversarial_enabled is False and cfg.twinflow_rectify_weight == 1.0


def test_overrides_apply_on_top_of_file(tmp_path):
    cfg = load_config(write(tmp_path, SEED_GLANCE), ["--zero_stage", "3", "--use_ema", "--lora-rank=8",
                                                    "--learning_rate", "3e-4"])
    assert (cfg.zero_stage, cfg.use_ema, cfg.lora_rank, cfg.learning_rate) == (3, True, 8, 3e-4)


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--b=2", "--flag"], FIELDS) == {"a": "1", "b": "2", "flag": "true"}
    with pytest.raises(ConfigError, match="unexpected command-line argument"):
        parse_overrides(["oops"], FIELDS)
    with pytest.raises(ConfigError, match=r"--max_train_steps needs a value \(--max_train_steps VALUE; Optimizer"):
        parse_overrides(["--max_train_steps", "--use_ema"], FIELDS)  # a bare flag is true: only booleans can be one
    assert parse_overrides(["--use_ema", "--max-train-steps=3"], FIELDS) == {"use_ema": "true", "max_train_steps": "3"}


GLANCE = {"method": "glance", "flow_custom_timesteps": None, "glance_slow_timesteps": "1000, 900",
          "glance_fast_timesteps": "500, 200"}


@pytest.mark.parametrize("bad, message", [
    ({"lora_rnk": 4}, "unknown config key 'lora_rnk'.*did you mean 'lora_rank'"),
    ({"--twinflow_estimate_ordr": 2}, "did you mean 'twinflow_estimate_order'"),
    ({"zero_stage": 4}, "'zero_stage' must be <= 3"),
    ({"learning_rate": "fast"}, "'learning_rate' expects float"),
    ({"learning_rate": 0}, "'learning_rate' must be > 0"),
    ({"train_batch_size": 1.5}, "'train_batch_size' expects int"),
    ({"use_ema": "maybe"}, "'use_ema' expects bool"),
    ({"model_type": "lora2"}, "'model_type' must be one of: lora, full; got 'lora2'"),
    ({"flow_timesteps_mode": "round_robin"}, "did you mean 'round-robin'"),
    ({"distillation_method": "dmd"}, "'distillation_method' must be one of: null; got 'dmd'"),
    ({"max_train_steps": 0}, "'max_train_steps' must be >= 1"),
    ({"method": "glance", "glance_slow_timesteps": "0.9", "glance_fast_timesteps": "0.3"},
     "'flow_custom_timesteps' is not used by method 'glance'"),
    ({"glance_fast_timesteps": "0.3"}, "'glance_fast_timesteps' is not used by method 'flow'"),
    ({"deepspeed_config": "/nonexistent/ds.json"}, "deepspeed_config not found: /nonexistent/ds.json"),
    ({"offload_param": True, "zero_stage": 2}, "'offload_param' needs zero_stage 3"),
    ({"model_type": "full"}, "'flow_custom_timesteps' with model_type 'full': .* set model_type 'lora'"),
    ({"flow_custom_timesteps": "[]"}, "empty"),
    ({"flow_custom_timesteps": "1000, nan"}, "non-finite"),
    ({"flow_custom_timesteps": "1200, 20"}, "out of range"),
    ({"flow_custom_timesteps": "-0.5, 0.3"}, "negative"),
    ({"twinflow_enhanced_range": [0.5, 0.2]}, "twinflow_enhanced_range"),
    ({"twinflow_enhanced_range": "0.2,high"}, "twinflow_enhanced_range"),
    ({"twinflow_enhanced_range": [0.1, 0.2, 0.3]}, "twinflow_enhanced_range"),
    # a Glance schedule that cannot be sampled fails here, not after the Slow phase has trained
    ({**GLANCE, "glance_slow_timesteps": "1000, 900", "glance_fast_timesteps": "950, 500"},
     "glance_slow_timesteps, glance_fast_timesteps: every Slow sigma must lie above every Fast one: Slow's lowest is "
     "0.9, Fast's highest 0.95$"),
    ({**GLANCE, "glance_fast_timesteps": "0"}, "the Fast list needs a sigma > 0"),
])
def test_errors_name_the_key(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, merged(SEED_GLANCE, bad)))


def test_every_unknown_key_is_named_at_once(tmp_path):
    """A config brought from elsewhere may hold several keys fewstep does not have: one error names them all, each
    with where it was given and its closest option, before the first bad value is even looked at."""
    path = write(tmp_path, merged(SEED_GLANCE, {"--lora_rnk": 4, "push_to_hubb": True, "zero_stage": 9}))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["--max_train_stepz", "3"])
    msg = str(err.value)
    assert msg.startswith("3 unknown config keys: ")
    assert f"'lora_rnk' in {path} (did you mean 'lora_rank'?)" in msg and f"'push_to_hubb' in {path}" in msg
    assert "'max_train_stepz' on the command line (did you mean 'max_train_steps'?)" in msg
    assert "zero_stage" not in msg  # values are checked once the keys are all known


def test_twinflow_requires_ema_unless_allowed(tmp_path):
    data = {**SEED_TWINFLOW, "use_ema": False}
    with pytest.raises(ConfigError, match="EMA teacher"):
        load_config(write(tmp_path, data))
    assert load_config(write(tmp_path, {**data, "twinflow_allow_no_ema_teacher": True})).use_ema is False
    assert load_config(write(tmp_path, {**data, "twinflow_require_ema": False})).resolved_method == "twinflow"


def test_command_line_values_read_as_users_write_them(tmp_path):
    """yes / YES / True are booleans, a negative number is a value (not the next flag), a JSON list is one list, an '='
    inside a --key=value value stays, and nan is no learning rate."""
    path = write(tmp_path, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", "model_type": "lora"})
    for yes in ("yes", "YES", "True"):
        assert load_config(path, ["--gradient_checkpointing", yes]).gradient_checkpointing is True
    assert load_config(path, ["--flow_logit_mean", "-0.5"]).flow_logit_mean == -0.5
    assert load_config(path, ["--lora_targets", '["to_q", "to_k"]']).lora_targets == ["to_q", "to_k"]
    assert load_config(path, ["--validation_prompt=a=b"]).validation_prompt == "a=b"
    with pytest.raises(ConfigError, match="'learning_rate' expects float, got 'nan'"):
        load_config(path, ["--learning_rate", "nan"])
    # a trailing comma, a blank and a repeat in another case name one format (a blank was an unknown format)
    assert load_config(path, ["--lora_export_formats", "diffusers, ,Diffusers,"]).lora_export_formats == ["diffusers"]


def test_an_empty_timestep_list_is_simpletuners_off(tmp_path):
    """SimpleTuner reads flow_custom_timesteps "" as no list (normal timestep sampling); a ported config carrying it
    loads, TwinFlow included (it refuses a list); an empty JSON list stays an error (a list with nothing in it)."""
    assert load_config(write(tmp_path, {**SEED_TWINFLOW, "flow_custom_timesteps": ""})).flow_custom_timesteps is None
    assert load_config(write(tmp_path, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux",
                                        "model_type": "lora", "--flow_custom_timesteps": " "})).resolved_method == "flow"


def test_twinflow_requires_flow_matching_unless_diff2flow(tmp_path):
    with pytest.raises(ConfigError, match="flow_matching"):
        load_config(write(tmp_path, merged(SEED_TWINFLOW, {"prediction_type": "epsilon"})))
    diff2flow = {"prediction_type": "epsilon", "diff2flow_enabled": True, "twinflow_allow_diff2flow": True}
    # the seed's diff2flow addition applies to a diffusion base: as written, with model_family sdxl, it loads
    sdxl = {**SEED_TWINFLOW, "model_family": "sdxl", "pretrained_model_name_or_path": "tiny:sdxl"}
    cfg = load_config(write(tmp_path, {**sdxl, **diff2flow}))
    assert (cfg.model_family, cfg.prediction_type) == ("sdxl", "epsilon")
    # ... and is refused, naming both, for a flow-matching family
    with pytest.raises(ConfigError, match="prediction_type 'epsilon'.*model_family 'sd3' is a flow-matching model"):
        load_config(write(tmp_path, merged(SEED_TWINFLOW, diff2flow)))
    # a diffusion base without the addition is told what to add; other methods are refused
    with pytest.raises(ConfigError, match=r"'sdxl' is a diffusion model.*\"diff2flow_enabled\": true"):
        load_config(write(tmp_path, sdxl))
    with pytest.raises(ConfigError, match="sdxl' trains with method 'twinflow'"):
        load_config(write(tmp_path, {**sdxl, **diff2flow, "twinflow_enabled": False, "method": "flow"}))
    # a Glance-style list on a diffusion base is refused as such first (the diff2flow addition would not help)
    glance_on_sdxl = {"model_family": "sdxl", "pretrained_model_name_or_path": "tiny:sdxl", "model_type": "lora",
                      "flow_custom_timesteps": "1000, 900"}
    with pytest.raises(ConfigError, match="sdxl' trains with method 'twinflow' \\(through diff2flow\\), not 'flow'"):
        load_config(write(tmp_path, glance_on_sdxl))


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="'pretrained_model_name_or_path' is required"):
        load_config(write(tmp_path, {"model_family": "flux"}))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.json"))


@pytest.mark.parametrize("key, default, other, message", [
    ("flow_use_beta_schedule", False, True, "the beta schedule is not implemented"),
    ("flow_sigmoid_scale", 1.0, 2.0, "flow_logit_std"),
    ("base_model_precision", "no_change", "int8-quanto", "quantised bases .* are not supported"),
    ("scheduled_sampling_max_step_offset", 0, 2, "scheduled sampling is not implemented"),  # TwinFlow's guide: off
    ("lora_type", "standard", "lycoris", "LyCORIS is not supported"),  # was 'did you mean lora_init_type'
    ("validation_guidance_rescale", 0.0, 0.7, "not rescaled"),  # was 'did you mean validation_guidance_real'
    ("musubi_blocks_to_swap", 0, 18, "block swapping is not implemented"),
    ("num_train_epochs", 0, 3, "set max_train_steps"),
    ("push_to_hub", False, True, "fewstep does not upload"),
    ("gradient_checkpointing_interval", 1, 2, "recomputes every block"),
])
def test_simpletuner_options_fewstep_lacks_are_accepted_only_at_what_fewstep_does(tmp_path, key, default, other,
                                                                                message):
    """A SimpleTuner config may carry them at the value that asks for what fewstep does anyway (mostly the feature
    off): accepted, no effect. Another value names what fewstep does instead, not a near-miss option of another
    meaning (flow_use_beta_schedule was once answered with 'did you mean flow_use_uniform_schedule')."""
    load_config(write(tmp_path, merged(SEED_GLANCE, {f"--{key}": default})))
    load_config(write(tmp_path, SEED_GLANCE), [f"--{key}", str(default).lower()])
    with pytest.raises(ConfigError, match=f"'{key}' in .* is {other!r}: fewstep takes only .* here .*{message}"):
        load_config(write(tmp_path, merged(SEED_GLANCE, {f"--{key}": other})))


# SimpleTuner's config/config.json.example, as its keys and kinds of values go (LyCORIS left out), with the keys its
# examples folder adds most: before fewstep read SimpleTuner's spelling, 14 of them were 'unknown config key'.
SIMPLETUNER_EXAMPLE = {
    "--resume_from_checkpoint": "latest", "--data_backend_config": "config/multidatabackend.json",
    "--aspect_bucket_rounding": 2, "--seed": 42, "--minimum_image_size": 0, "--output_dir": "output/models",
    "--max_train_steps": 10000, "--num_train_epochs": 0, "--checkpoint_step_interval": 500,
    "--checkpoints_total_limit": 5, "--hub_model_id": "my-lora", "--push_to_hub": "false",
    "--push_checkpoints_to_hub": "false", "--tracker_project_name": "lora-training", "--tracker_run_name": "my-lora",
    "--report_to": "none", "--model_type": "lora", "--model_family": "flux", "--model_flavour": "dev",
    "--train_batch_size": 1, "--gradient_checkpointing": "true", "--caption_dropout_probability": 0.1,
    "--resolution_type": "pixel_area", "--resolution": 1024, "--validation_seed": 42,
    "--validation_step_interval": 500, "--validation_guidance": 3.0, "--validation_guidance_rescale": "0.0",
    "--validation_num_inference_steps": "20", "--validation_prompt": "A photo-realistic image of a cat",
    "--mixed_precision": "bf16", "--optimizer": "adamw_bf16", "--learning_rate": "1e-4", "--lr_scheduler": "polynomial",
    "--lr_warmup_steps": 100, "--validation_torch_compile": "false", "--disable_benchmark": "false",
    "vae_batch_size": 1, "disable_bucket_pruning": True, "quantize_via": "cpu", "compress_disk_cache": True,
    "validation_disable_unconditional": True, "grad_clip_method": "norm", "base_model_precision": "no_change",
    "lora_type": "standard", "validation_prompt_library": False}


def test_a_simpletuner_config_loads_as_simpletuner_reads_it(tmp_path):
    from fewstep.config_warnings import config_warnings
    cfg = load_config(write(tmp_path, SIMPLETUNER_EXAMPLE))
    assert cfg.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"  # model_flavour dev
    assert (cfg.checkpointing_steps, cfg.validation_steps) == (500, 500)  # SimpleTuner's newer names
    assert (cfg.optimizer, cfg.lr_scheduler, cfg.lr_end, cfg.lr_power) == ("adamw", "polynomial", 4e-7, 0.8)
    assert (cfg.resolution, cfg.resolution_type, cfg.minimum_image_size) == (1024, "pixel_area", 0.0)
    assert cfg.vae_batch_size == 1  # the cache fill's, as SimpleTuner's
    area = load_config(write(tmp_path, {**SIMPLETUNER_EXAMPLE, "--resolution_type": "area", "--resolution": 1.0}))
    assert (area.resolution, area.resolution_type) == (1.0, "area")  # megapixels: a config's resolution too
    for changes, message in (({"--resolution_type": "area", "--resolution": 1000}, "in megapixels with resolution_"
                               "type 'area' \\(e.g. 1.0\\), got 1000"),
                             ({"--resolution_type": "pixel", "--resolution": 2.5}, "an integer >= 8, got 2.5"),
                             ({"--resolution_type": "pixel_area", "--resolution": 4}, "a number >= 8, got 4")):
        with pytest.raises(ConfigError, match=f"^'resolution' is .*{message}$"):
            load_config(write(tmp_path, {**SIMPLETUNER_EXAMPLE, **changes}))
    notes = config_warnings(cfg)
    assert notes[0] == "model_flavour dev: loading black-forest-labs/FLUX.1-dev"
    assert notes[1].startswith("optimizer adamw_bf16 trains as adamw (")
    ignored = notes[2]
    assert ignored.startswith("SimpleTuner options with no effect in fewstep: hub_model_id (fewstep makes no hub")
    for key in ("validation_torch_compile", "disable_benchmark", "disable_bucket_pruning",
                "quantize_via", "compress_disk_cache", "validation_disable_unconditional"):
        assert f"; {key} (" in ignored
    for key in ("push_to_hub", "num_train_epochs", "aspect_bucket_rounding", "grad_clip_method", "lora_type",
                "vae_batch_size"):
        assert key not in " ".join(notes)  # at the value fewstep trains anyway: nothing to say


def test_simpletuner_renamed_options_are_one_option(tmp_path):
    both = merged(SEED_GLANCE, {"checkpoint_step_interval": 20, "--checkpointing_steps": 30})
    with pytest.raises(ConfigError, match=r"'checkpoint_step_interval' in .* \(20\) and 'checkpointing_steps' in .* "
                                          r"\(30\) are one option .*keep one"):
        load_config(write(tmp_path, both))
    assert load_config(write(tmp_path, {**both, "--checkpointing_steps": "20.0"})).checkpointing_steps == 20
    # a command-line value wins over the file's, whichever spelling either uses (as for any option)
    renamed = write(tmp_path, merged(SEED_GLANCE, {"checkpoint_step_interval": 250}))
    assert load_config(renamed, ["--checkpointing_steps", "100"]).checkpointing_steps == 100
    plain = write(tmp_path, merged(SEED_GLANCE, {"checkpointing_steps": 250}))
    assert load_config(plain, ["--checkpoint_step_interval", "100"]).checkpointing_steps == 100
    with pytest.raises(ConfigError, match="are one option"):
        load_config(plain, ["--checkpoint_step_interval", "100", "--checkpointing_steps", "7"])
    # null: SimpleTuner's default (it skips a null option)
    assert load_config(write(tmp_path, {**SEED_GLANCE, "checkpoint_step_interval": None})).checkpointing_steps == \
        load_config(write(tmp_path, SEED_GLANCE)).checkpointing_steps
    cfg = load_config(write(tmp_path, SEED_GLANCE), ["--save_total_limit", "2", "--validation_step_interval", "7"])
    assert (cfg.checkpoints_total_limit, cfg.validation_steps) == (2, 7)
    # SimpleTuner's one LoRA format: fewstep writes diffusers' file too (its sampler reads it)
    assert load_config(write(tmp_path, {**SEED_GLANCE, "lora_format": "comfyui"})).lora_export_formats == \
        ["diffusers", "comfyui"]
    with pytest.raises(ConfigError, match=r"'lora_format' in .* \('comfyui'\) and 'lora_export_formats' in .* are "):
        load_config(write(tmp_path, {**SEED_GLANCE, "lora_format": "comfyui", "lora_export_formats": "diffusers"}))
    assert load_config(write(tmp_path, {**SEED_GLANCE, "lora_format": "comfyui"}), [
        "--lora_export_formats", "diffusers"]).lora_export_formats == ["diffusers"]
    # the same formats written both ways agree; a format SimpleTuner has not is refused under its own name; a full
    # fine-tune writes no LoRA file (SimpleTuner ignores lora_format there)
    for listed in (["diffusers", "comfyui"], ["comfyui", "diffusers"], "comfyui, diffusers"):
        assert load_config(write(tmp_path, {**SEED_GLANCE, "lora_format": "comfyui", "lora_export_formats": listed})
                           ).lora_export_formats in (["diffusers", "comfyui"], ["comfyui", "diffusers"])
    with pytest.raises(ConfigError, match=r"^'lora_format' in .* is 'kohya': SimpleTuner's choices are diffusers, "):
        load_config(write(tmp_path, {**SEED_GLANCE, "lora_format": "kohya"}))
    full = merged(SEED_TWINFLOW, {"model_type": "full", "lora_format": "comfyui"})
    assert load_config(write(tmp_path, full)).lora_export_formats == ["diffusers"]
    # a renamed option's bad value names the key as the user wrote it
    for key, value, message in (("checkpoint_step_interval", "abc", "'checkpointing_steps' expects int"),
                                ("save_total_limit", 0, "'checkpoints_total_limit' must be >= 1")):
        with pytest.raises(ConfigError, match=rf"{message}.* \(given as SimpleTuner's '{key}' in .*c\.json\)"):
            load_config(write(tmp_path, {**SEED_GLANCE, key: value}))


def test_a_config_in_simpletuners_spelling_clips_gradients_as_simpletuner_does(tmp_path):
    """SimpleTuner clips each gradient value (to 2.0 by default), fewstep the global norm (to 1.0): a config in
    SimpleTuner's spelling (a key only SimpleTuner has) gets SimpleTuner's clipping where it sets none, and says so;
    one in fewstep's gets fewstep's."""
    from fewstep.config_warnings import config_warnings
    spelled = {**SEED_GLANCE, "checkpoint_step_interval": 20}
    for extra, clipping in (({}, ("value", 2.0)), ({"max_grad_norm": 0.01}, ("value", 0.01)),
                            ({"grad_clip_method": "norm"}, ("norm", 2.0)),
                            ({"grad_clip_method": "norm", "max_grad_norm": 1.0}, ("norm", 1.0))):
        cfg = load_config(write(tmp_path, {**spelled, **extra}))
        assert (cfg.grad_clip_method, cfg.max_grad_norm) == clipping, extra
        said = [n for n in config_warnings(cfg) if "SimpleTuner's default for a config in its spelling" in n]
        assert len(said) == (len(extra) < 2), extra
    assert "training clips each gradient value to +-0.01" in config_warnings(
        load_config(write(tmp_path, {**spelled, "max_grad_norm": 0.01})))[0]
    cfg = load_config(write(tmp_path, SEED_GLANCE))  # fewstep's spelling: fewstep's defaults, nothing said
    assert (cfg.grad_clip_method, cfg.max_grad_norm) == ("norm", 1.0) and not config_warnings(cfg)
    cfg = load_config(write(tmp_path, SEED_GLANCE), ["--save_total_limit", "2"])  # the file's spelling decides,
    assert (cfg.grad_clip_method, cfg.max_grad_norm) == ("norm", 1.0)  # not a command-line override's
    # SimpleTuner's cosine restarts every lr_warmup_steps steps; fewstep's decays once: said, not reproduced
    cfg = load_config(write(tmp_path, {**spelled, "lr_scheduler": "cosine"}))
    assert any(n.startswith("lr_scheduler cosine decays once") for n in config_warnings(cfg))


def test_model_flavour_names_the_familys_model(tmp_path):
    from fewstep.config_warnings import config_warnings
    bare = {k: v for k, v in SEED_TWINFLOW.items() if k != "pretrained_model_name_or_path"}
    assert load_config(write(tmp_path, {**bare, "model_flavour": "large"})).pretrained_model_name_or_path == \
        "stabilityai/stable-diffusion-3.5-large"
    for flavour in ("medium", "some-finetune"):  # the path wins, and says so; any flavour then
        cfg = load_config(write(tmp_path, {**SEED_TWINFLOW, "model_flavour": flavour}))
        assert cfg.pretrained_model_name_or_path == "tiny:sd3"
        assert f"model_flavour {flavour} not used: pretrained_model_name_or_path names the model (tiny:sd3)" in \
            config_warnings(cfg)
    with pytest.raises(ConfigError, match=r"'model_flavour' in .* must be a name such as 'medium', got \['large'\]"):
        load_config(write(tmp_path, {**bare, "model_flavour": ["large"]}))
    with pytest.raises(ConfigError, match="'model_flavour' in .* is 'turbo': model_family sd3 has the flavours "
                                          "medium, large"):
        load_config(write(tmp_path, {**bare, "model_flavour": "turbo"}))
    with pytest.raises(ConfigError, match="'model_flavour' in .* is 'kontext': FLUX.1 Kontext is an image-editing"):
        load_config(write(tmp_path, {**bare, "model_family": "flux", "model_flavour": "kontext"}))
    with pytest.raises(ConfigError, match="'pretrained_model_name_or_path' is required"):
        load_config(write(tmp_path, {**bare, "model_flavour": None}))


def test_polynomial_schedule_is_simpletuners(tmp_path):
    """lr_scheduler polynomial decays from learning_rate to lr_end with power lr_power after the warmup, as
    transformers' get_polynomial_decay_schedule_with_warmup (which SimpleTuner's copies) does."""
    import torch
    from transformers import get_polynomial_decay_schedule_with_warmup

    from fewstep.engine.deepspeed_engine import lr_lambda
    cfg = load_config(write(tmp_path, SEED_TWINFLOW), ["--lr_scheduler", "polynomial", "--max_train_steps", "50",
                                                      "--lr_warmup_steps", "10", "--lr_end", "1e-6",
                                                      "--lr_power", "0.5"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=cfg.learning_rate)
    ref = get_polynomial_decay_schedule_with_warmup(opt, 10, 50, lr_end=1e-6, power=0.5).lr_lambdas[0]
    ours = lr_lambda(cfg)
    for step in range(10, 60):
        assert ours(step) == pytest.approx(ref(step), rel=1e-12), step
    assert ours(50) * cfg.learning_rate == pytest.approx(1e-6) and ours(10) == 1.0
    with pytest.raises(ConfigError, match="'lr_end' 0.001 must be below learning_rate 0.0001"):
        load_config(write(tmp_path, SEED_TWINFLOW), ["--lr_scheduler", "polynomial", "--lr_end", "1e-3"])


def test_an_integer_reads_the_same_from_the_command_line_and_json(tmp_path):
    """10.0 is 10 in a JSON file and on the command line alike ("10.0" was refused there); 10.5 is refused in both,
    and a seed of 20 digits stays exact."""
    for given in (10.0, "10.0", "1e1", "10"):
        assert load_config(write(tmp_path, merged(SEED_GLANCE, {"--max_train_steps": given}))).max_train_steps == 10
        assert load_config(write(tmp_path, SEED_GLANCE), ["--max_train_steps", str(given)]).max_train_steps == 10
    for bad in (10.5, "10.5", "inf"):
        with pytest.raises(ConfigError, match="'max_train_steps' expects int"):
            load_config(write(tmp_path, SEED_GLANCE), ["--max_train_steps", str(bad)])
    assert load_config(write(tmp_path, SEED_GLANCE), ["--seed", str(2 ** 64 - 1)]).seed == 2 ** 64 - 1
    assert load_config(write(tmp_path, SEED_GLANCE), ["--seed", "12345678901234567891.0"]).seed == \
        12345678901234567891  # read exactly, not through a float
    with pytest.raises(ConfigError, match="'seed' expects int"):
        load_config(write(tmp_path, SEED_GLANCE), ["--seed", "1e100000000"])


def test_a_choice_is_matched_without_case(tmp_path):
    """`--report_to None` is the choice "none" (it was read as null: "'report_to' may not be null")."""
    cfg = load_config(write(tmp_path, SEED_GLANCE), ["--report_to", "None", "--mixed_precision", "BF16"])
    assert cfg.report_to == "none" and cfg.mixed_precision == "bf16"


def test_enhanced_ratio_of_one_or_more_needs_a_frozen_teacher(tmp_path):
    with pytest.raises(ConfigError, match="'twinflow_enhanced_ratio' 1.0 >= 1 with a teacher that follows"):
        load_config(write(tmp_path, merged(SEED_TWINFLOW, {"twinflow_enhanced_ratio": 1.0})))
    cfg = load_config(write(tmp_path, merged(SEED_TWINFLOW, {"twinflow_enhanced_ratio": 1.5, "ema_decay": 1.0})))
    assert cfg.twinflow_enhanced_ratio == 1.5  # a frozen teacher: the scale stays 1 + r


def test_list_options_from_the_command_line(tmp_path):
    cfg = load_config(write(tmp_path, SEED_TWINFLOW), ["--twinflow_enhanced_range", "0,0.8"])
    assert cfg.twinflow_enhanced_range == [0.0, 0.8]


def test_glance_method_needs_both_lists(tmp_path):
    with pytest.raises(ConfigError, match="glance_slow_timesteps"):
        load_config(write(tmp_path, merged(SEED_GLANCE, {"method": "glance", "flow_custom_timesteps": None})))


def test_none_string_is_a_valid_choice_not_null(tmp_path):
    assert load_config(write(tmp_path, merged(SEED_GLANCE, {"report_to": "none"}))).report_to == "none"
    cfg = load_config(write(tmp_path, merged(SEED_GLANCE, {"distillation_method": "null"})))
    assert cfg.distillation_method is None


def test_twinflow_group_weights_from_file_and_command_line(tmp_path):
    path = write(tmp_path, SEED_TWINFLOW)
    assert load_config(path).twinflow_group_weights == [1, 1, 1, 1]  # the reference's equal split
    assert load_config(path, ["--twinflow_group_weights", "2,1,1,1"]).twinflow_group_weights == [2, 1, 1, 1]
    assert load_config(write(tmp_path, merged(SEED_TWINFLOW, {"twinflow_group_weights": [1, 1, 2, 1]}))
                       ).twinflow_group_weights == [1, 1, 2, 1]
    for bad in ([0, 1, 1, 1], [1, 1, 1], [1.5, 1, 1, 1]):
        with pytest.raises(ConfigError, match="'twinflow_group_weights' must be 4 positive integers"):
            load_config(write(tmp_path, merged(SEED_TWINFLOW, {"twinflow_group_weights": bad})))


def test_a_key_given_twice_in_one_file_is_an_error(tmp_path):
    """'--model_family' and 'model_family' in one JSON: which was meant is not guessed (the last one used to win)."""
    with pytest.raises(ConfigError, match=r"'model_family' is given twice \(as 'model_family' and '--model_family'\)"):
        load_config(write(tmp_path, {**SEED_TWINFLOW, "--model_family": "flux"}))


def test_a_key_given_twice_in_a_json_file_is_refused(tmp_path):
    """json.load keeps the last of two equal keys without a word: a config with "lora_rank": 8 and later
    "lora_rank": 4 trained rank 4. The same in a data config and a DeepSpeed config."""
    from fewstep.data.backends import load_data_config
    from fewstep.data.errors import DataError

    path = tmp_path / "c.json"
    path.write_text('{"model_family": "flux", "--lora_rank": 8, "pretrained_model_name_or_path": "tiny:flux", '
                    '"--lora_rank": 4}')
    with pytest.raises(ConfigError, match=f"^{path}: '--lora_rank' is given twice in one JSON object; keep one$"):
        load_config(str(path))
    data = tmp_path / "multidatabackend.json"
    data.write_text('[{"id": "a", "type": "local", "instance_data_dir": "x", "resolution": 512, "resolution": 1024}]')
    with pytest.raises(DataError, match="'resolution' is given twice"):
        load_data_config(str(data))
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "stage": 3}}')
    with pytest.raises(ConfigError, match="'stage' is given twice"):
        load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": str(ds)})))


def test_deepspeed_config_must_be_a_json_object(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{zero_optimization: 3}")
    with pytest.raises(ConfigError, match="ds.json: not valid JSON"):
        load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": str(bad)})))
    bad.write_text("[3]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": str(bad)})))
    for section in ('"zero_optimization": null', '"bf16": true'):  # a section fewstep generates and merges into
        bad.write_text("{" + section + "}")
        with pytest.raises(ConfigError, match=f"ds.json: '{section.split(chr(34))[1]}' must be a JSON object"):
            load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": str(bad)})))


def test_deepspeed_config_sections_fewstep_reads_must_be_objects(tmp_path):
    """`"checkpoint": [1]` crashed fewstep's own check of the merged config, and `"timers": null` (a section fewstep
    generates) or `"fp16": true` crashed inside deepspeed.initialize after the model load, each with a traceback."""
    bad = tmp_path / "ds.json"
    for section, value in (("checkpoint", [1]), ("timers", None), ("fp16", True), ("torch_autocast", "bf16")):
        bad.write_text(json.dumps({section: value}))
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": str(bad)})))
        assert str(e.value).startswith(f"deepspeed_config {bad}: '{section}' must be a JSON object"), str(e.value)
        assert str(e.value).endswith(f"got {json.dumps(value)}")


def test_a_json_file_that_is_not_utf8_is_not_valid_json(tmp_path):
    """A Latin-1 byte in a JSON file ended in a UnicodeDecodeError traceback (every JSON file fewstep reads)."""
    bad = tmp_path / "ds.json"
    bad.write_bytes(b'{"zero_optimization": {"stage": 2}, "note": "caf\xe9"}')
    with pytest.raises(ConfigError, match="ds.json: not valid JSON .*utf-8"):
        load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": str(bad)})))
    config = tmp_path / "config.json"
    config.write_bytes(b'{"model_family": "flux\xe9"}')
    with pytest.raises(ConfigError, match="config.json: not valid JSON .*utf-8"):
        load_config(str(config))


def test_a_json_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """A file that is there but cannot be opened (no read permission, an I/O error) names itself; as root, a
    permission error cannot be made with chmod, so open() raises it."""
    import builtins

    path = write(tmp_path, SEED_TWINFLOW)
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == path:
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(ConfigError, match=f"config file cannot be read: {path} \\(Permission denied\\)"):
        load_config(path)


def test_offload_checks_use_the_stage_a_deepspeed_config_sets(tmp_path):
    """configs/deepspeed/zero3.json sets stage 3 while zero_stage stays at its default 2: offload_param is valid
    there, and a file that sets stage 2 refuses it, naming the file."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": str(ds), "offload_param": True})))
    assert cfg.offload_param and cfg.zero_stage == 2
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"'offload_param' needs zero_stage 3 \(got ZeRO stage 2 from "
                                          r"deepspeed_config"):
        load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": str(ds), "offload_param": True,
                                                            "zero_stage": 3})))


SIMPLETUNER_DEEPSPEED = {  # SimpleTuner's documented inline deepspeed_config (documentation/DEEPSPEED.md)
    "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu", "pin_memory": True},
                          "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4, "warmup_num_steps": 500}},
    "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}


@pytest.mark.parametrize("given", ["object", "json text", "file"])
def test_simpletuners_inline_deepspeed_config_is_read_as_simpletuner_reads_it(tmp_path, given):
    """SimpleTuner's deepspeed_config may be the object itself (in a config file; JSON text on the command line) or a
    file. Its optimizer section is the optimizer DeepSpeed builds (its params set fewstep's AdamW options); what
    fewstep does not use (DeepSpeed's scheduler, the batch sizes, a parameter offload below stage 3) is said in
    one warning each; accelerate's "auto" values keep fewstep's."""
    from fewstep.config_warnings import config_warnings
    from fewstep.engine.deepspeed_engine import build_ds_config
    from fewstep.planning.layouts import configured_layout

    ds = {**SIMPLETUNER_DEEPSPEED, "zero_optimization": {**SIMPLETUNER_DEEPSPEED["zero_optimization"],
                                                         "reduce_bucket_size": "auto"}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    value = {"object": ds, "json text": json.dumps(ds), "file": str(tmp_path / "ds.json")}[given]
    base = merged(SEED_TWINFLOW, {"--learning_rate": 1e-3, "--gradient_accumulation_steps": 2})
    if given == "json text":
        cfg = load_config(write(tmp_path, base), ["--deepspeed_config", value])
    else:
        cfg = load_config(write(tmp_path, merged(base, {"--deepspeed_config": value})))
    assert cfg.deepspeed_config == (str(tmp_path / "ds.json") if given == "file" else ds)
    assert (cfg.optimizer, cfg.learning_rate, cfg.adam_beta2, cfg.adam_weight_decay) == ("deepspeed", 1e-4, 0.95, 0.01)
    assert "its values replace the config's (learning_rate 0.001 -> 0.0001)" in " | ".join(config_warnings(cfg))
    built = build_ds_config(cfg)
    assert built["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                              "weight_decay": 0.01}}
    assert built["zero_optimization"]["reduce_bucket_size"] == 5e8  # "auto": fewstep's
    assert built["gradient_accumulation_steps"] == cfg.gradient_accumulation_steps == 2
    warned = " | ".join(config_warnings(cfg))
    for said in ("its optimizer section is the optimizer", "its scheduler section (WarmupLR) is not used",
                 "gradient_accumulation_steps 4 is not used", "train_micro_batch_size_per_gpu 2 is not used",
                 "train_batch_size 8 is not used", "offload_param is not used at ZeRO stage 2"):
        assert said in warned, warned
    assert configured_layout(cfg) == (2, True, False)  # the planner: no parameter offload below stage 3
    assert "'foo_bar' not used: not a DeepSpeed option" in " | ".join(
        config_warnings(load_config(write(tmp_path, merged(base, {"--deepspeed_config": {"foo_bar": 1}})))))


def test_deepspeed_config_optimizer_and_nvme_mistakes_are_one_line(tmp_path):
    def refused(ds, match, **options):
        with pytest.raises(ConfigError, match=match):
            from fewstep.engine.deepspeed_engine import build_ds_config
            build_ds_config(load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": ds,
                                                                                **options}))))

    refused({"optimizer": {"type": "Lamb"}}, r"optimizer type 'Lamb' is not supported")
    refused({"optimizer": {"type": "AdamW", "params": {"lr": -1}}},
            r"'learning_rate' must be > 0.0, got -1.0 \(from the optimizer section of deepspeed_config \(the object")
    refused({"optimizer": {"params": {"betas": 0.9}}}, r"optimizer.params.betas must be a list of two numbers")
    refused(["zero"], r"'deepspeed_config' expects a DeepSpeed JSON file's path or a JSON object")
    refused({"zero_optimization": {"stage": 3, "offload_param": "cpu"}},
            r"zero_optimization.offload_param must be a JSON object such as \{\"device\": \"cpu\"\}, got \"cpu\"")
    with pytest.raises(ConfigError, match=r"^deepspeed_config: 'stage' is given twice in one JSON object"):
        load_config(write(tmp_path, SEED_TWINFLOW), ["--deepspeed_config", '{"zero_optimization": {"stage": 2, '
                                                                           '"stage": 3}}'])
    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme/swap"}}}
    refused(nvme, r"offload_param.device nvme \(ZeRO-Infinity\) is not supported: the partitioned load writes the "
                  r"pretrained weights into each rank's in-memory ZeRO-3 shards", use_ema=False,
            twinflow_require_ema=False, twinflow_allow_no_ema_teacher=True)
    from fewstep.engine.deepspeed_engine import build_ds_config
    # below stage 3 DeepSpeed ignores a parameter offload, NVMe or not: a warning, not a refusal; an unused
    # offload_param_path is said too
    from fewstep.config_warnings import config_warnings
    low = {"zero_optimization": {"stage": 2, "offload_param": {"device": "nvme"}}}
    build_ds_config(load_config(write(tmp_path, merged(SEED_TWINFLOW, {"deepspeed_config": low}))))
    said = config_warnings(load_config(write(tmp_path, merged(SEED_TWINFLOW, {"offload_param_path": "/nvme/x"}))))
    assert "offload_param_path /nvme/x not used: fewstep offloads to the CPU only, never to an NVMe drive" in said


def test_deepspeed_config_knows_every_key_deepspeed_reads():
    """The keys DeepSpeed's config reads at its top level (from its source) are known: an unknown one is said to be
    unused, and a near-miss of a known one refused as a typo, so a real key missing here would be refused."""
    import inspect
    import re

    import deepspeed.runtime.config as ds_config
    import deepspeed.runtime.constants as constants
    from fewstep.engine.ds_config_checks import KNOWN_KEYS

    source = inspect.getsource(ds_config)
    names = set(re.findall(r"get_scalar_param\(\s*param_dict,\s*([A-Z][A-Z0-9_]*)", source))
    names |= set(re.findall(r"([A-Z][A-Z0-9_]*)\s+in\s+param_dict(?:\.keys\(\))?\b(?!\[)", source))
    read = {getattr(constants, n, getattr(ds_config, n, None)) for n in names} - {None}
    assert len(read) > 20 and read <= set(KNOWN_KEYS), sorted(read - set(KNOWN_KEYS))


def test_twinflow_options_without_twinflow_are_refused(tmp_path):
    """The seed's TwinFlow block without `twinflow_enabled: true` would train plain flow matching without a word."""
    off = {k: v for k, v in SEED_TWINFLOW.items() if k != "twinflow_enabled"}
    off["twinflow_estimate_order"] = 3
    with pytest.raises(ConfigError, match=r"'twinflow_target_step_count', 'twinflow_estimate_order'.*TwinFlow is "
                                          r"off \(method 'flow'\): set twinflow_enabled true, or remove them"):
        load_config(write(tmp_path, off))
    with pytest.raises(ConfigError, match=r"^'twinflow_estimate_order' set, .*remove it$"):
        load_config(write(tmp_path, merged(SEED_GLANCE, {"twinflow_estimate_order": 4})))
    at_defaults = {k: v for k, v in off.items() if k not in ("twinflow_target_step_count", "twinflow_estimate_order")}
    assert load_config(write(tmp_path, at_defaults)).resolved_method == "flow"  # keys left at their defaults: fine


@pytest.mark.parametrize("value", ["to_q, to_k", " to_q,to_k ,", ["to_q", " to_k"]])
def test_lora_targets_spaces_and_empty_items_are_dropped(tmp_path, value):
    cfg = load_config(write(tmp_path, merged(SEED_GLANCE, {"lora_targets": value})))
    assert cfg.lora_targets == ["to_q", "to_k"]


def test_a_flag_takes_yes_or_no_only(tmp_path):
    assert load_config(write(tmp_path, merged(SEED_GLANCE, {"use_ema": 1}))).use_ema is True
    with pytest.raises(ConfigError, match=r"'use_ema' expects bool, got 2"):
        load_config(write(tmp_path, merged(SEED_GLANCE, {"use_ema": 2})))


@pytest.mark.parametrize("null", ["null", "none", "None"])
def test_null_clears_a_timestep_list_from_the_command_line(tmp_path, null):
    """The timestep lists (typed Any) took 'null' for a list ("'null' is not a number"), unlike every other optional
    option: the seed's Slow config could not become a Glance run from the command line."""
    path = write(tmp_path, SEED_GLANCE)
    assert load_config(path, ["--flow_custom_timesteps", null]).flow_custom_timesteps is None
    cfg = load_config(path, ["--method", "glance", "--flow_custom_timesteps", null,
                             "--glance_slow_timesteps", "1000,980,960", "--glance_fast_timesteps", "900,600,300"])
    assert cfg.resolved_method == "glance" and cfg.flow_custom_timesteps is None
    with pytest.raises(ConfigError, match="method 'glance' needs 'glance_slow_timesteps'"):
        load_config(path, ["--method", "glance", "--flow_custom_timesteps", null, "--glance_slow_timesteps", null,
                           "--glance_fast_timesteps", "900,600,300"])


def test_validation_resolution_is_a_size(tmp_path):
    assert load_config(write(tmp_path, SEED_GLANCE), ["--validation_resolution", "1024x768"]).validation_resolution \
        == "1024x768"
    assert load_config(write(tmp_path, {**SEED_GLANCE, "validation_resolution": 512})).validation_resolution == \
        "512x512"
    assert load_config(write(tmp_path, SEED_GLANCE)).validation_resolution is None  # the training resolution's square
    assert load_config(write(tmp_path, {**SEED_GLANCE, "validation_resolution": "1"})).validation_resolution == \
        "1024x1024"  # SimpleTuner's 1 megapixel
    for bad, why in (("1024x768,512x512", "one size: SimpleTuner's list"), ("big", "WIDTHxHEIGHT"),
                     ("4x4", "each side must be 8 to 8192"), (True, "WIDTHxHEIGHT"), ("0.5", "megapixels"),
                     (64, "megapixels")):
        with pytest.raises(ConfigError, match=f"'validation_resolution' .*{why}"):
            load_config(write(tmp_path, {**SEED_GLANCE, "validation_resolution": bad}))


def test_every_refusal_and_unknown_key_of_a_config_is_in_one_error(tmp_path):
    """A SimpleTuner config may carry several features fewstep lacks: the user fixes them all in one go."""
    path = write(tmp_path, merged(SEED_GLANCE, {"base_model_precision": "int8-quanto", "loss_type": "huber",
                                                "lora_rnk": 4}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    for part in ("'base_model_precision' in", "'loss_type' in", "unknown config key 'lora_rnk'"):
        assert part in msg, msg


def test_lr_end_and_lr_power_outside_the_polynomial_schedule_are_named(tmp_path):
    from fewstep.config_warnings import config_warnings
    cfg = load_config(write(tmp_path, SEED_GLANCE), ["--lr_scheduler", "cosine", "--lr_end", "1e-6"])
    assert "lr_end not used: lr_scheduler cosine decays to 0 (only polynomial decays to lr_end, with power " \
           "lr_power)" in config_warnings(cfg)
    assert not any("lr_end" in w for w in config_warnings(load_config(write(tmp_path, SEED_GLANCE), [
        "--lr_scheduler", "polynomial", "--lr_end", "1e-6"])))


def test_grad_clip_method_value_turns_deepspeeds_norm_clip_off(tmp_path):
    from fewstep.engine.deepspeed_engine import build_ds_config
    value = load_config(write(tmp_path, SEED_GLANCE), ["--grad_clip_method", "value", "--max_grad_norm", "0.5"])
    assert build_ds_config(value)["gradient_clipping"] == 0.0  # the values are clipped by fewstep instead
    assert build_ds_config(load_config(write(tmp_path, SEED_GLANCE)))["gradient_clipping"] == 1.0
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_clipping": 2.0}))
    with pytest.raises(ConfigError, match="sets gradient_clipping .* while grad_clip_method is 'value'"):
        load_config(write(tmp_path, SEED_GLANCE), ["--grad_clip_method", "value", "--deepspeed_config", str(ds)])
    # a config in SimpleTuner's spelling gets 'value' by default: the message says how to keep DeepSpeed's clip
    spelled = write(tmp_path, {**SEED_GLANCE, "checkpoint_step_interval": 20, "deepspeed_config": str(ds)})
    with pytest.raises(ConfigError, match="SimpleTuner's default, which a config in its spelling gets\\): set "
                                          "grad_clip_method norm, or remove gradient_clipping"):
        load_config(spelled)
    assert build_ds_config(load_config(spelled, ["--grad_clip_method", "norm"]))["gradient_clipping"] == 2.0


def test_user_prompt_library_is_checked_before_training_and_named_for_files(tmp_path):
    from fewstep.validation_settings import library_prompts
    lib = tmp_path / "library.json"
    lib.write_text(json.dumps({"anime_<token>": "an anime <token>", "anime <token>": "another", "": "a third",
                               "Cat": {"prompt": "a cat"}, "cat": "a cat too", "x" * 300: "long"}))
    cfg = load_config(write(tmp_path, {**SEED_GLANCE, "user_prompt_library": str(lib)}))
    assert library_prompts(cfg) == [("anime__token", "an anime <token>"), ("anime_token", "another"),
                                    ("prompt", "a third"), ("Cat", "a cat"), ("cat_2", "a cat too"), ("x" * 100, "long")]
    for content, why in (("[1]", "expected a JSON object of nickname -> prompt"),
                         ('{"a": ""}', "entry 'a' must be a prompt"), ("{", "not valid JSON"),
                         ('{"a": {"prompt": "p", "adapter_strength": 0.5}}', "sets adapter_strength: fewstep reads")):
        lib.write_text(content)
        with pytest.raises(ConfigError, match=why):
            load_config(write(tmp_path, {**SEED_GLANCE, "user_prompt_library": str(lib)}))
    with pytest.raises(ConfigError, match="user_prompt_library not found: .*nope.json"):
        load_config(write(tmp_path, {**SEED_GLANCE, "user_prompt_library": str(tmp_path / "nope.json")}))
