"""The typed config: every option declared once, with type, default, allowed values and help.

Users bring SimpleTuner-style JSON (`{"--model_family": "flux", ...}` or without the dashes); command-line overrides
(`--key value`) are applied on top. SimpleTuner's own names and values are read by `fewstep.config_simpletuner`;
unknown keys fail with the closest valid key; bad types and ranges fail naming the key (`fewstep.config_values`), and
options that contradict each other in `fewstep.config_checks`: all before any compute starts.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from fewstep.config_simpletuner import COMMAND_LINE
from fewstep.config_simpletuner import translate as from_simpletuner
from fewstep.config_values import closest_keys, coerce, normalize_key, parse_overrides
from fewstep.engine.host_memory import DEFAULT_THRESHOLD as DEFAULT_MMAP_THRESHOLD
from fewstep.engine.host_memory import MAX_THRESHOLD as MAX_MMAP_THRESHOLD
from fewstep.errors import ConfigError
from fewstep.jsonfile import load_json

__all__ = ["Config", "ConfigError", "FIELDS", "load_config", "describe_options", "stage_set_by", "zero_stage_in_use"]


SEED_MAX = 2 ** 64 - 1  # torch's generators take unsigned 64-bit seeds (launcher/sample.py's --seed too)


def opt(default, help: str, *, choices=None, lo=None, hi=None, lo_open=False):
    """Declare an option: default, help text, and optional allowed values / numeric range."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)

DIFFUSION_FAMILIES = ("sdxl",)  # epsilon/v-prediction bases: TwinFlow through diff2flow only


@dataclass
class Config:
    # ---- model ----
    model_family: str = opt(None, "Model family: flux, sd3, qwen_image (flow matching) or sdxl (an epsilon/v "
                                  "diffusion base, TwinFlow through diff2flow).",
                            choices=("flux", "sd3", "qwen_image", "sdxl"))
    model_type: str = opt("lora", "lora (peft adapters on a frozen base) or full (full fine-tuning).",
                          choices=("lora", "full"))
    pretrained_model_name_or_path: str = opt(None, "Local diffusers directory, hub id, or tiny:<family> (built-in).")
    method: Optional[str] = opt(None, "flow (plain flow matching), glance or twinflow. Default: twinflow when "
                                      "twinflow_enabled, else flow.", choices=(None, "flow", "glance", "twinflow"))
    prediction_type: str = opt("flow_matching", "What the base model predicts.",
                               choices=("flow_matching", "epsilon", "v_prediction"))
    diff2flow_enabled: bool = opt(False, "Bridge an epsilon/v-prediction base to flow matching (TwinFlow only).")
    distillation_method: Optional[str] = opt(None, "Accepted for SimpleTuner compatibility; must be null.",
                                             choices=(None,))
    flux_guidance_value: float = opt(1.0, "Guidance embedding value fed to guidance-distilled Flux models.", lo=0.0)
    gradient_checkpointing: bool = opt(False, "Recompute transformer blocks in backward to save activation memory.")
    mixed_precision: str = opt("bf16", "Training precision: bf16 or fp32 ('no' means fp32).",
                               choices=("bf16", "fp32", "no"))

    # ---- LoRA ----
    lora_rank: int = opt(16, "LoRA rank.", lo=1)
    lora_alpha: Optional[float] = opt(None, "LoRA alpha (default: equal to lora_rank).", lo=0.0, lo_open=True)
    lora_targets: Optional[list] = opt(None, "Module names to adapt (list or comma string); default per family.")
    lora_dropout: float = opt(0.0, "LoRA dropout probability.", lo=0.0, hi=1.0)
    lora_init_type: str = opt("default", "LoRA A-matrix initialisation (B starts at zero either way): default = "
                              "peft's Kaiming-uniform; gaussian = normal with std 1/rank (the Glance paper's code). "
                              "SimpleTuner's loftq, olora and pissa rewrite the base weights and are not offered.",
                              choices=("default", "gaussian"))
    lora_export_formats: list = opt(["diffusers"], "LoRA files each export writes (list or comma string): diffusers "
                                    "(pytorch_lora_weights.safetensors, always written) and comfyui (also "
                                    "pytorch_lora_weights_comfyui.safetensors: the ComfyUI/kohya lora_unet_ layout "
                                    "over the original checkpoint's module names; flux, qwen_image and sdxl).")

    # ---- data ----
    data_backend_config: Optional[str] = opt(None, "Path to a multidatabackend.json (SimpleTuner format).")
    data_backend_sampling: str = opt("auto-weighting", "How each batch picks its entry of the data config: "
                                     "'auto-weighting' (SimpleTuner's default) by probability x the entry's number "
                                     "of images (repeats included), 'uniform' by probability alone.",
                                     choices=("auto-weighting", "uniform"))
    resolution: Optional[float] = opt(None, "Training resolution of the data entries that set none (SimpleTuner's "
                                            "global default; an entry's own 'resolution' wins), in the units of "
                                            "their resolution_type: pixels, or megapixels for area.", lo=0.0,
                                      lo_open=True)
    resolution_type: Optional[str] = opt(None, "resolution_type of the data entries that set none: pixel (the short "
                                               "side; fewstep's default), pixel_area (the area of a resolution-sized "
                                               "square) or area (megapixels).",
                                         choices=(None, "pixel", "pixel_area", "area"))
    minimum_image_size: Optional[float] = opt(None, "minimum_image_size of the data entries that set none (images "
                                                    "smaller are skipped; in the entry's resolution_type units).",
                                              lo=0.0)
    maximum_image_size: Optional[float] = opt(None, "maximum_image_size of the data entries that set none (with "
                                                    "crop: true, larger images are first resized to "
                                                    "target_downsample_size).", lo=0.0, lo_open=True)
    target_downsample_size: Optional[float] = opt(None, "target_downsample_size of the data entries that set none.",
                                                  lo=0.0, lo_open=True)
    caption_strategy: Optional[str] = opt(None, "caption_strategy of the data entries that set none: textfile "
                                                "(fewstep's default), filename (SimpleTuner's) or instanceprompt.",
                                          choices=(None, "textfile", "filename", "instanceprompt"))
    caption_dropout_probability: float = opt(0.0, "Probability of training on the empty-prompt embedding.",
                                             lo=0.0, hi=1.0)
    cache_dir: Optional[str] = opt(None, "Where VAE latents and text embeddings are cached (default output_dir/cache). "
                                         "Shared or node-local: the ranks that see one directory fill it together, "
                                         "so a node-local path (e.g. $SLURM_TMPDIR/cache) is filled once per node. "
                                         "$VARS and ~ are expanded (on rank 0; every rank uses its path).")
    vae_batch_size: int = opt(8, "Images the cache fill encodes per VAE call: lower it if the fill runs out of GPU "
                                 "memory (SimpleTuner's default is 4). Cached latents are not encoded again.", lo=1)
    text_encoder_batch_size: int = opt(8, "Prompts the cache fill encodes per text-encoder call, where the prompts' "
                                          "text_embeds entry sets none: lower it if the fill runs out of GPU memory.",
                                       lo=1)

    # ---- optimisation ----
    output_dir: str = opt("output", "Run directory: checkpoints, logs, LoRA weights, samples.")
    seed: int = opt(0, "Global seed (each rank derives its own stream from it).", lo=0, hi=SEED_MAX)
    train_batch_size: int = opt(1, "Micro-batch size per GPU.", lo=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", lo=1)
    max_train_steps: int = opt(100, "Optimizer steps to train (per phase for Glance).", lo=1)
    learning_rate: float = opt(1e-4, "Peak learning rate.", lo=0.0, lo_open=True)
    lr_scheduler: str = opt("constant", "LR schedule after warmup: constant, linear or cosine decay to 0, or "
                                        "polynomial decay to lr_end with power lr_power (SimpleTuner's "
                                        "recommendation).",
                            choices=("constant", "constant_with_warmup", "linear", "cosine", "polynomial"))
    lr_end: float = opt(4e-7, "The polynomial schedule's final learning rate (SimpleTuner's default).", lo=0.0)
    lr_power: float = opt(0.8, "The polynomial schedule's power: 1 decays linearly, less than 1 keeps the rate "
                               "higher for longer (SimpleTuner's default 0.8).", lo=0.0, lo_open=True)
    lr_warmup_steps: int = opt(0, "Linear warmup steps.", lo=0)
    optimizer: str = opt("adamw", "adamw: torch.optim.AdamW (no JIT build); deepspeed: DeepSpeed's own AdamW "
                                  "(FusedAdam, or DeepSpeedCPUAdam with offload_optimizer: JIT-compiled ops, ~40 s "
                                  "each on first use, cached in $TORCH_EXTENSIONS_DIR).",
                         choices=("adamw", "deepspeed"))
    adam_beta1: float = opt(0.9, "AdamW beta1.", lo=0.0, hi=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2.", lo=0.0, hi=1.0)
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay.", lo=0.0)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", lo=0.0, lo_open=True)
    max_grad_norm: float = opt(1.0, "Gradient clipping limit (0 disables): of the global norm, or of each value "
                                    "(grad_clip_method).", lo=0.0)
    grad_clip_method: str = opt("norm", "How max_grad_norm clips: norm (the global gradient norm, DeepSpeed's "
                                        "gradient_clipping) or value (each gradient value to +-max_grad_norm, "
                                        "SimpleTuner's default).", choices=("norm", "value"))
    nan_policy: str = opt("skip-then-stop", "A step whose loss or gradients are non-finite on any rank never updates "
                                            "the model (parameters, optimizer state, LR schedule and step count stay "
                                            "as they were). skip-then-stop: skip it, and stop (exit 1) after "
                                            "nan_max_bad_steps such steps in a row; stop: stop at the first; skip: "
                                            "skip them all.", choices=("skip-then-stop", "stop", "skip"))
    nan_max_bad_steps: int = opt(5, "skip-then-stop: how many non-finite steps in a row end the run.", lo=1)
    nan_trace: bool = opt(False, "Diagnosis: hooks on every denoiser module find where a non-finite value first "
                                 "appears (the first module output in forward order, the first output gradient in "
                                 "backward order); a skipped step's message names them. Slows every step (a device "
                                 "sync per module).")

    # ---- flow-matching sigma sampling ----
    flow_use_uniform_schedule: bool = opt(False, "Sample sigma uniformly instead of logit-normal.")
    flow_logit_mean: float = opt(0.0, "Mean of the logit-normal sigma distribution.")
    flow_logit_std: float = opt(1.0, "Std of the logit-normal sigma distribution.", lo=0.0, lo_open=True)
    flow_schedule_shift: float = opt(1.0, "Static shift s: sigma' = s*sigma / (1 + (s-1)*sigma). 1 = none.",
                                     lo=0.0, lo_open=True)
    flow_schedule_auto_shift: bool = opt(False, "Resolution-dependent shift (Flux rule: mu from image tokens).")
    flow_custom_timesteps: Optional[Any] = opt(None, "Sigmas (all <= 1) or 0-1000 timesteps a LoRA trains on "
                                                     "exclusively: one Glance half per run, as SimpleTuner's guide "
                                                     "(method glance takes both lists instead). JSON list, comma "
                                                     "string or list. No shift.")
    flow_timesteps_mode: str = opt("fixed-list", "How custom timesteps are drawn: fixed-list (uniform with "
                                                 "replacement) or round-robin (cursor over the global batch).",
                                   choices=("fixed-list", "round-robin"))

    # ---- Glance ----
    glance_slow_timesteps: Optional[Any] = opt(None, "method glance: the Slow LoRA's timestep list.")
    glance_fast_timesteps: Optional[Any] = opt(None, "method glance: the Fast LoRA's timestep list.")

    # ---- TwinFlow (SimpleTuner key names and defaults) ----
    twinflow_enabled: bool = opt(False, "Enable TwinFlow (RCGM any-step training). Requires distillation_method null.")
    twinflow_target_step_count: int = opt(1, "Sampling steps of TwinFlow's validation images (launcher/sample.py: "
                                                "--steps, default 2).", lo=1, hi=8)
    twinflow_estimate_order: int = opt(2, "RCGM order N: teacher sub-steps per target.", lo=0, hi=16)
    twinflow_enhanced_ratio: float = opt(
        0.5, "CFG-enhanced target ratio r (0 disables): the student learns a guided field, CFG scale 1 + r, drifting "
        "towards 1/(1 - r) with an EMA teacher; 0 keeps the unguided distribution. With ema_decay 1 (a frozen "
        "teacher) the target is the teacher's own guided field at CFG scale r, as the reference (r = 1: its "
        "conditional field; r = 0 keeps the data velocity).", lo=0.0)
    twinflow_enhanced_range: list = opt([0.0, 1.0], "Open time interval (lo, hi) in which the CFG enhancement applies.")
    twinflow_delta_t: float = opt(0.01, "RCGM pre-step Delta.", lo=0.0, hi=1.0, lo_open=True)
    twinflow_target_clamp: float = opt(1.0, "Clamp c on the RCGM residual.", lo=0.0, lo_open=True)
    twinflow_require_ema: bool = opt(True, "Refuse to run without an EMA teacher (use_ema) ...")
    twinflow_allow_no_ema_teacher: bool = opt(False, "... unless the live student may act as teacher.")
    twinflow_allow_diff2flow: bool = opt(False, "With diff2flow_enabled: allow epsilon/v-prediction bases.")
    twinflow_adversarial_enabled: bool = opt(False, "Self-adversarial branch: L_adv and L_rectify.")
    twinflow_adversarial_weight: float = opt(1.0, "Weight of L_adv.", lo=0.0)
    twinflow_group_weights: list = opt([1, 1, 1, 1], "Batch shares of the e2e, mul, any and adv groups (positive "
                                                     "integers; equal = the reference's split).")
    twinflow_rectify_weight: float = opt(1.0, "Weight of L_rectify (multiplies the reference's 0.5).", lo=0.0)
    twinflow_teacher_rows: str = opt("used", "Rows the teacher passes (CFG target, RCGM rollout) run on: used = only "
                                     "those whose output the loss uses (the same loss up to rounding; at a batch of 2+ "
                                     "per rank and the default groups 26% fewer teacher rows, 45% with the "
                                     "adversarial branch; none at batch 1), all = the whole batch, as the reference. "
                                     "A model with dropout always runs all (the passes replay the student's dropout "
                                     "masks).", choices=("used", "all"))

    # ---- EMA ----
    use_ema: bool = opt(False, "Keep an EMA of the trained weights (TwinFlow's teacher).")
    ema_decay: float = opt(0.995, "Target EMA decay D (0: teacher = live model; 1: frozen).", lo=0.0, hi=1.0)

    # ---- distributed / engine ----
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage 0-3.", lo=0, hi=3)
    deepspeed_config: Optional[Any] = opt(None, "A DeepSpeed config whose entries override fewstep's generated one: "
                                                "a JSON file's path, or the object itself (SimpleTuner's inline "
                                                "form; JSON text on the command line). Values \"auto\" keep "
                                                "fewstep's; an optimizer section sets the AdamW options (optimizer "
                                                "deepspeed).")
    offload_param_path: Optional[str] = opt(None, "SimpleTuner's NVMe folder for a DeepSpeed offload to nvme, "
                                                  "accepted and not used: fewstep refuses NVMe offload (README).")
    offload_optimizer: bool = opt(False, "ZeRO-Offload (stages 1-3): fp32 masters and Adam states on CPU, stepped "
                                         "there (fast with optimizer deepspeed: DeepSpeedCPUAdam; torch AdamW "
                                         "with adamw).")
    offload_param: bool = opt(False, "ZeRO-3 parameter offload to CPU.")
    distributed_timeout_seconds: float = opt(
        1800.0, "Timeout of every collective (NCCL/gloo process group) before the job aborts. Uneven work (cache "
        "fill, rank-0 exports and validation decoding, checkpoint writes) waits without it, and the start-up rendezvous "
        "at least 1800 s.", lo=1.0)
    fused_kernels: str = opt("auto", "Triton kernels: auto (on CUDA), on, off.", choices=("auto", "on", "off"))
    malloc_mmap_threshold: int = opt(
        DEFAULT_MMAP_THRESHOLD, "Host memory: glibc's mmap threshold in bytes, fixed on every rank at start so that "
        "freed tensors at or above it return to the OS (glibc's own threshold moves up to 32 MiB and then keeps freed "
        "weights' memory: 5.8 instead of 4.2 GiB per rank measured; 1 MiB keeps small tensors on the fast heap: "
        "bench/RESULTS.md). 0 keeps glibc's moving threshold; MALLOC_MMAP_THRESHOLD_ in the environment wins.",
        lo=0, hi=MAX_MMAP_THRESHOLD)

    # ---- checkpoints ----
    checkpointing_steps: int = opt(500, "Save a resumable checkpoint every N optimizer steps, and at the end of each phase, before its "
                                   "export (0: only there).",
                                   lo=0)
    checkpoints_total_limit: int = opt(3, "Keep this run's newest K checkpoints (a later run's steps, left by a "
                                          "resume from an earlier step, are kept and not counted).", lo=1)
    resume_from_checkpoint: Optional[str] = opt(None, "'latest', a checkpoint directory, or a bare 'step-N' "
                                                "('checkpoint-N') of this run's checkpoints, to resume from. Unset, "
                                                "an output_dir that holds checkpoints is refused.")

    # ---- validation and logging ----
    validation_steps: int = opt(0, "Render validation images every N steps (0: only at the end).", lo=0)
    validation_prompt: Optional[str] = opt(None, "Validation prompt (default: the first training caption).")
    user_prompt_library: Optional[str] = opt(None, "A JSON file of {nickname: prompt} (SimpleTuner's): validation "
                                                   "also renders each prompt, as validation/<phase>-step<NNNNNN>-"
                                                   "<nickname>.png.")
    validation_negative_prompt: Optional[str] = opt(None, "The prompt validation's classifier-free guidance steers "
                                                          "away from (SimpleTuner's key; default: launcher/sample.py's,"
                                                          " ' ' for the flow families as the Glance reference samples "
                                                          "Qwen-Image, the empty prompt for SDXL; SimpleTuner's is "
                                                          "'blurry, cropped, ugly').")
    validation_resolution: Any = opt(None, "Size of validation images in pixels: 'WIDTHxHEIGHT', or one side for a "
                                           "square (snapped down to the model's multiple; default: a square at the "
                                           "first data entry's resolution).")
    validation_num_inference_steps: int = opt(20, "Sampling steps for validation (flow method).", lo=1)
    validation_guidance: Optional[float] = opt(None, "Guidance of validation images, as in SimpleTuner: for FLUX the "
                                                     "distilled-guidance value (default flux_guidance_value), for the "
                                                     "other families the classifier-free guidance scale, against "
                                                     "validation_negative_prompt (<= 1: none; "
                                                     "default: the family's, as launcher/sample.py: Qwen-Image 5). "
                                                     "TwinFlow samples without CFG, at the training value.", lo=0.0)
    validation_guidance_real: Optional[float] = opt(None, "FLUX: classifier-free guidance scale of validation images, "
                                                          "against validation_negative_prompt (<= 1 or null: none), "
                                                          "as in SimpleTuner.", lo=0.0)
    validation_seed: int = opt(0, "Seed for validation noise (fixed, so images are comparable across steps).", lo=0,
                               hi=SEED_MAX)
    report_to: str = opt("tensorboard", "Where rank 0 logs scalars and validation images: tensorboard, wandb, all "
                                        "(both; also 'tensorboard,wandb') or none. W&B offline: WANDB_MODE=offline.",
                         choices=("tensorboard", "wandb", "all", "none", "tensorboard,wandb", "wandb,tensorboard"))
    logging_dir: Optional[str] = opt(None, "TensorBoard directory, and where W&B keeps its run folder unless WANDB_DIR "
                                           "is set (default output_dir/logs).")
    tracker_project_name: str = opt("fewstep", "W&B project (SimpleTuner's key).")
    tracker_run_name: Optional[str] = opt(None, "W&B run name (SimpleTuner's key; default: the output_dir's name).")

    # ------------------------------------------------------------------
    @property
    def resolved_method(self) -> str:
        return resolved_method(self.method, self.twinflow_enabled)

    @property
    def bf16(self) -> bool:
        return self.mixed_precision == "bf16"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Cross-field checks (single fields were checked when set): `fewstep.config_checks`."""
        from fewstep.config_checks import validate
        return validate(self)


def stage_set_by(user_ds: dict) -> bool:
    """Whether a deepspeed_config file's contents set the ZeRO stage."""
    return "stage" in (user_ds.get("zero_optimization") or {})


def zero_stage_in_use(zero_stage: int, user_ds: dict) -> int:
    """The ZeRO stage training runs: the deepspeed_config file's `zero_optimization.stage` if it sets one (e.g.
    configs/deepspeed/zero3.json), else the `zero_stage` option."""
    return (user_ds.get("zero_optimization") or {}).get("stage", zero_stage)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def resolved_method(method: Optional[str], twinflow_enabled: bool) -> str:
    """The method a config trains: `method`, else TwinFlow where `twinflow_enabled`, else plain flow matching (also
    for a run's recorded config: `fewstep.sampling.run_method`)."""
    return method or ("twinflow" if twinflow_enabled else "flow")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def load_config(path: Optional[str] = None, overrides: Optional[dict | list] = None) -> Config:
    """Read a JSON config (SimpleTuner key spelling accepted), apply overrides, check everything."""
    raw: dict[str, Any] = {}
    source: dict[str, str] = {}
    if path is not None:
        data = load_json(path, ConfigError, "config file")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of options")
        spelled: dict[str, str] = {}
        for k, v in data.items():
            key = normalize_key(k)
            if key in spelled:  # '--model_family' and 'model_family': which one was meant?
                raise ConfigError(f"{path}: '{key}' is given twice (as {spelled[key]!r} and {k!r}); keep one")
            spelled[key] = k
            raw[key], source[key] = v, f" in {path}"
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides, FIELDS)
    for k, v in (overrides or {}).items():
        raw[normalize_key(k)], source[normalize_key(k)] = v, COMMAND_LINE
    notes, problems, given_as = from_simpletuner(raw, source)
    unknown = [k for k in raw if k not in FIELDS]
    if unknown:  # all of them at once: a config brought from elsewhere may have several
        problems.append(closest_keys(unknown, source, FIELDS))
    if problems:
        raise ConfigError("; ".join(problems))
    values = {}
    for key, value in raw.items():
        try:
            values[key] = coerce(key, FIELDS[key], value)
        except ConfigError as e:
            if key not in given_as:
                raise
            raise ConfigError(f"{e} (given as SimpleTuner's '{given_as[key]}'{source[key]})") from None
    cfg = Config(**values).validate()
    cfg.simpletuner_notes = notes  # logged at start-up with the config's warnings (not an option: not a field)
    return cfg


def describe_options() -> str:
    """A Markdown table of every option (used for the README and `train.py --help`)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Config):
        default = _default(f)
        rows.append(f"| `{f.name}` | `{json.dumps(default)}` | {f.metadata['help']} |")
    return "\n".join(rows)
