"""Sampling loops shared by validation and `launcher/sample.py`, and the sampler's device, dtype and offload choices.

A model function here is `model_fn(x, sigma[B]) -> v` (flow velocity, v = noise - data). Euler over a sigma list is
x <- x + (sigma_next - sigma) v; TwinFlow uses its scheduler's UCGM step with the any-step inputs tt and sign.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from fewstep.config import resolved_method
from fewstep.errors import UserError
from fewstep.lora import RUN_INFO
from fewstep.methods.flow_matching import shift_sigmas

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
OFFLOAD_MODES = ("none", "model", "sequential")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what `load_lora_weights` reads from a folder


class _TextEncoderHasNoLora(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


def load_lora(pipe, directory: str, **kwargs) -> None:
    """`pipe.load_lora_weights(directory)` without diffusers' warning that a text encoder found no LoRA keys:
    fewstep's LoRAs train the denoiser alone, so it is always true of them (its note for the denoiser is another
    logger's and stays)."""
    logger, quiet = logging.getLogger("diffusers.loaders.lora_base"), _TextEncoderHasNoLora()
    logger.addFilter(quiet)
    try:
        pipe.load_lora_weights(directory, **kwargs)
    finally:
        logger.removeFilter(quiet)


class SamplingError(UserError, ValueError):
    """A sampling request that cannot run as asked (device, dtype, offload, run directory)."""


class NotARunDir(SamplingError, FileNotFoundError):
    """The directory holds no fewstep export (no `fewstep_run.json`)."""


def flow_sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """The base model's Euler schedule: linspace(1, 1/steps) with the static shift (diffusers' default grid)."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return shift_sigmas(s, shift).tolist()


@torch.no_grad()
def euler_loop(model_fn: Callable, x: torch.Tensor, sigmas: Sequence[float],
               on_step: Callable[[int], None] | None = None, to_zero: bool = True) -> torch.Tensor:
    """Euler over `sigmas` (a terminal 0 is appended if missing, unless `to_zero` is False: then it stops at the last
    sigma, as Glance's Slow half stops where Fast starts). `on_step(i)` runs before step i (adapter switch)."""
    sigmas = list(sigmas) + ([] if sigmas[-1] == 0 or not to_zero else [0.0])
    for i in range(len(sigmas) - 1):
        if on_step is not None:
            on_step(i)
        s = torch.full((x.shape[0],), sigmas[i], device=x.device, dtype=torch.float32)
        v = model_fn(x, s).float()
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v).to(x.dtype)
    return x


@torch.no_grad()
def twinflow_loop(model_fn: Callable, x: torch.Tensor, scheduler, steps: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """UCGM few-step sampling: model_fn(x, sigma, tt) with the scheduler's target times; sign is +1 throughout."""
    scheduler.set_timesteps(num_inference_steps=steps, device=x.device)
    tts = scheduler.target_times()
    for i, t in enumerate(scheduler.timesteps):
        s = torch.full((x.shape[0],), float(scheduler.sigmas[i]), device=x.device, dtype=torch.float32)
        tt = torch.full_like(s, float(tts[i]))
        v = model_fn(x, s, tt)
        x = scheduler.step(v, t, x, generator=generator, return_dict=False)[0]
    return x


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1, 1] -> PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def grid(images: list[Image.Image]) -> np.ndarray:
    """Images side by side as one HWC uint8 array (for TensorBoard)."""
    return np.concatenate([np.asarray(im) for im in images], axis=1)


def run_info(directory: str, option: str = "") -> dict:
    """The `fewstep_run.json` the trainer writes beside each export (config, trained sigmas, phase). `option`: the
    command-line option that named `directory` (`--lora`), for the errors."""
    from fewstep.jsonfile import load_json

    named = f"{option} {directory}" if option else directory
    if not os.path.isdir(directory):
        raise NotARunDir(f"{named} does not exist: expected a fewstep output directory (a run's export)"
                         if not os.path.exists(directory) else
                         f"{named} is a file: expected a fewstep output directory")
    path = os.path.join(directory, RUN_INFO)
    if not os.path.exists(path):
        glance = os.path.isdir(os.path.join(directory, "glance-slow"))
        run = os.path.dirname(os.path.dirname(os.path.abspath(directory)))  # <output_dir>/checkpoints/step-N
        checkpoint = os.path.exists(os.path.join(directory, "trainer.json"))
        export = (f"{os.path.join(run, 'glance-slow')} and {os.path.join(run, 'glance-fast')}"
                  if os.path.isdir(os.path.join(run, "glance-slow")) else run)
        raise NotARunDir(f"{named} has no {RUN_INFO}: " + (
            "a Glance run exports to its glance-slow/ and glance-fast/ folders" if glance else
            f"it is a training checkpoint; sample the run's export ({export}), written when the run (or a phase) "
            "ends: resume the run to its end to export" if checkpoint else
            "is it a fewstep output directory? (a run exports when it, or its phase, ends)"))
    info = load_json(path, SamplingError, "run info")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise SamplingError(f"{path}: not a fewstep run info (a JSON object with the run's 'config')")
    return info


def run_method(info: dict) -> str:
    """The method the run trained (its config's `resolved_method`)."""
    cfg = info["config"]
    return resolved_method(cfg.get("method"), bool(cfg.get("twinflow_enabled")))


# the exports `--method` samples: a Glance Slow or Fast LoRA alone is a flow-matching LoRA, and a flow LoRA trained on
# a timestep list alone (SimpleTuner's two-run Glance, `flow_custom_timesteps`) is one half of a Glance pair
SAMPLES = {"flow": ("flow", "glance"), "twinflow": ("twinflow",), "glance": ("glance", "flow")}
GLANCE_PHASES = ("glance-slow", "glance-fast")


def check_export(option: str, directory: str, info: dict, method: str, denoiser_subfolder: str) -> None:
    """Before anything loads: the export `option` names is one `--method` samples, and holds the weights its run info
    records (the LoRA file or the full fine-tune's folder, and a TwinFlow export's any-step embeddings)."""
    from fewstep.full_export import WEIGHTS  # the full export's weight files

    trained = run_method(info)
    if trained not in SAMPLES[method]:
        raise SamplingError(f"--method {method}: {option} {directory} is a {trained} export (method {trained!r} in its "
                            f"{RUN_INFO}); sample it with --method {trained}")
    if method == "glance" and trained == "flow" and not info.get("sigmas"):
        raise SamplingError(f"--method glance: {option} {directory} is a flow export trained on the whole schedule; "
                            "a Glance half is trained on its timestep list alone (flow_custom_timesteps)")
    phase = info.get("phase")
    want = {"--slow": "glance-slow", "--fast": "glance-fast"}.get(option)
    if want and phase in GLANCE_PHASES and phase != want:
        raise SamplingError(f"{option} {directory} is the run's {phase} export; {option} takes its {want} export")
    if info["config"].get("model_type", "lora") == "full":
        full = os.path.join(directory, denoiser_subfolder)
        files = os.listdir(full) if os.path.isdir(full) else []
        if "config.json" not in files or not any(f.startswith(WEIGHTS) for f in files):
            raise SamplingError(f"{option} {directory}: its {RUN_INFO} records a full fine-tune, but "
                                f"{denoiser_subfolder}/ holds no config.json and diffusion_pytorch_model weights (a "
                                "partial copy?)")
    elif not os.path.isfile(os.path.join(directory, LORA_WEIGHTS_NAME)):
        raise SamplingError(f"{option} {directory}: its {RUN_INFO} records a LoRA export, but {LORA_WEIGHTS_NAME} is "
                            "missing (a partial copy?)")
    if method == "twinflow":
        anystep_dir(directory, denoiser_subfolder)


def load_glance_loras(pipe, slow_dir: str, fast_dir: str) -> None:
    """Load the Slow and Fast LoRAs into `pipe` as adapters "slow" and "fast" (Slow active), replacing adapters of
    those names loaded before."""
    loaded = [a for a in ("slow", "fast") if a in pipe.get_list_adapters().get(_denoiser_name(pipe), [])]
    if loaded:
        pipe.delete_adapters(loaded)
    load_lora(pipe, slow_dir, adapter_name="slow")
    load_lora(pipe, fast_dir, adapter_name="fast")
    pipe.set_adapters("slow")


def schedule_run_for(scheduler, sigmas: Sequence[float]) -> str | None:
    """None if `scheduler.set_timesteps(sigmas=...)` runs exactly `sigmas`; else what it runs instead. Diffusers'
    flow schedulers rewrite given sigmas per their config: `shift`, dynamic shifting, `shift_terminal`, Karras /
    exponential / beta spacing, `invert_sigmas`."""
    config = scheduler.config
    if config.get("use_dynamic_shifting"):  # by the image size (mu) at each call
        return "use_dynamic_shifting=True: shifted by the image size"
    probe = type(scheduler).from_config(config)
    probe.set_timesteps(sigmas=list(sigmas))
    ran = probe.sigmas[:len(sigmas)].double().cpu().tolist()
    if len(probe.sigmas) > len(sigmas) and all(abs(a - b) <= 1e-6 for a, b in zip(ran, sigmas)):
        return None
    return "it would run sigmas " + ", ".join(f"{x:.4g}" for x in ran)


def glance_pipeline_sample(pipe, prompt_kwargs: dict, slow_dir: str | None, fast_dir: str | None,
                           slow: Sequence[float], fast: Sequence[float], *, num_inference_steps: int | None = None,
                           **call_kwargs):
    """Glance inference with ONE stock diffusers pipeline: Slow LoRA for its sigmas, then Fast from where Slow stopped.

    The schedule is exactly slow + fast (+ the terminal 0 the pipeline appends); the Slow phase ends at the first Fast
    sigma instead of denoising to 0, and the scheduler must not shift custom sigmas (the caller's pipeline uses a
    FlowMatchEulerDiscreteScheduler without dynamic shifting). The active adapter switches after the last Slow step.
    slow_dir/fast_dir None: the adapters are loaded already (`load_glance_loras`, e.g. before `place_pipeline`); given,
    they are loaded (again) for this call. The adapters active before the call are active again after it. A
    `callback_on_step_end` given runs after the switch, at every step.
    """
    from fewstep.methods.glance import glance_schedule

    sigmas, boundary = glance_schedule(slow, fast)
    steps = len(sigmas) - 1
    ran = schedule_run_for(pipe.scheduler, sigmas[:-1])
    if ran is not None:  # diffusers shifts, stretches or re-spaces given sigmas as its config says
        raise ValueError(f"glance_pipeline_sample: the pipeline's {type(pipe.scheduler).__name__} shifts the sigmas it "
                         f"is given ({ran}), but the Slow/Fast lists are the schedule itself: set "
                         "pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)")
    if num_inference_steps is not None and num_inference_steps != steps:
        raise ValueError(f"num_inference_steps={num_inference_steps} must equal the Slow+Fast list length ({steps})")
    if slow_dir is not None or fast_dir is not None:
        load_glance_loras(pipe, slow_dir, fast_dir)
    active = pipe.get_active_adapters()
    pipe.set_adapters("slow")
    then = call_kwargs.pop("callback_on_step_end", None)  # the caller's own callback runs after the switch

    def switch(p, i, t, kwargs):
        if i == boundary - 1:
            p.set_adapters("fast")
        return then(p, i, t, kwargs) if then is not None else kwargs

    try:
        return pipe(**prompt_kwargs, sigmas=sigmas[:-1], num_inference_steps=steps, callback_on_step_end=switch,
                    **call_kwargs)
    finally:  # the adapters active before the call (Slow after `load_glance_loras`), also after an error
        pipe.set_adapters(active or "slow")


def listed_pipeline_sample(pipe, prompt_kwargs: dict, listed: Sequence[float], base: Sequence[float],
                           **call_kwargs):
    """A LoRA trained on the `listed` sigmas alone (`flow_custom_timesteps`), sampled as its run's validation samples
    it: the LoRA at its listed sigmas, the base model (LoRA off) at the other steps of the `base` schedule
    (`glance.listed_schedule`). The scheduler must take the sigmas as given (FlowMatchEulerDiscreteScheduler with
    shift 1 and no dynamic shifting)."""
    from fewstep.methods.glance import listed_schedule

    sigmas, on_list = listed_schedule(listed, base)
    ran = schedule_run_for(pipe.scheduler, sigmas[:-1])
    if ran is not None:
        raise ValueError(f"listed_pipeline_sample: the pipeline's {type(pipe.scheduler).__name__} rewrites the "
                         f"sigmas it is given ({ran})")

    def lora_on(p, on: bool):
        p.enable_lora() if on else p.disable_lora()

    then = call_kwargs.pop("callback_on_step_end", None)

    def toggle(p, i, t, kwargs):  # after step i: the model of step i + 1
        if i + 1 < len(on_list):
            lora_on(p, on_list[i + 1])
        return then(p, i, t, kwargs) if then is not None else kwargs

    lora_on(pipe, on_list[0])
    try:
        return pipe(**prompt_kwargs, sigmas=sigmas[:-1], num_inference_steps=len(on_list), callback_on_step_end=toggle,
                    **call_kwargs)
    finally:
        pipe.enable_lora()


def _denoiser_name(pipe) -> str:
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


# ---------------------------------------------------------------------------------------------- device and dtype


def resolve_device(name: str | None) -> torch.device:
    """`--device`: None picks cuda when torch sees a GPU, else cpu; 'cuda' or 'cuda:N' must name a visible GPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SamplingError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise SamplingError(f"device {name!r} is not supported by the sampler: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise SamplingError(f"--device {name} needs a CUDA GPU, but torch {torch.__version__} sees none "
                            f"(CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SamplingError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                            f"cuda:{torch.cuda.device_count() - 1})")
    return dev


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`--dtype`: bf16, fp16 or fp32. None: bf16 on a GPU that supports it, else fp32."""
    if name is None:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    dtype = DTYPES.get(str(name).lower())
    if dtype is None:
        raise SamplingError(f"unknown dtype {name!r}: expected bf16, fp16 or fp32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the short spelling `resolve_dtype` accepts)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def place_pipeline(pipe, device: torch.device, offload: str = "none"):
    """Put a loaded pipeline on `device`, or let diffusers offload it to CPU memory (needs accelerate).

    offload 'model': `enable_model_cpu_offload` keeps each whole model (text encoders, transformer, VAE) in CPU memory
    until its turn; 'sequential': `enable_sequential_cpu_offload` streams each submodule's weights in for its forward
    (least GPU memory, slowest). Load LoRAs and any-step weights first: after a LoRA load diffusers re-applies
    offloading only for its default device. The any-step embeddings stay on `device` (their forward reads its weights
    directly, which sequential offload would leave on the meta device).
    """
    if offload not in OFFLOAD_MODES:
        raise SamplingError(f"unknown offload mode {offload!r}: expected one of {', '.join(OFFLOAD_MODES)}")
    if offload == "none":
        return pipe.to(device)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise SamplingError(f"--offload {offload} needs accelerate (pip install accelerate)") from None
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        embed = getattr(denoiser, "anystep_embed", None)
        if embed is not None:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(embed, recurse=True)  # puts its weights back in CPU memory
            embed.to(torch.device(device.type, device.index or 0))
    return pipe


def anystep_dir(run_dir: str, denoiser_subfolder: str = "transformer") -> str:
    """Where a TwinFlow export keeps its any-step embeddings: beside the LoRA, or in the full fine-tune's
    `transformer/` (`unet/` for a UNet family)."""
    from fewstep.models.anystep import ANYSTEP_WEIGHTS_NAME

    for d in (run_dir, os.path.join(run_dir, denoiser_subfolder)):
        if os.path.exists(os.path.join(d, ANYSTEP_WEIGHTS_NAME)):
            return d
    raise SamplingError(f"{run_dir} holds no {ANYSTEP_WEIGHTS_NAME} (nor its {denoiser_subfolder}/), where a TwinFlow "
                        "export keeps its any-step embeddings (a partial copy?)")
