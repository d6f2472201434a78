"""Sampling loops shared by validation and `launcher/sample.py`.

A model function here is `model_fn(x, sigma[B]) -> v` (flow velocity, v = noise - data). Euler over a sigma list is
x <- x + (sigma_next - sigma) v; TwinFlow uses its scheduler's UCGM step with the any-step inputs tt and sign.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from fewstep.methods.flow_matching import shift_sigmas


def flow_sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """The base model's Euler schedule: linspace(1, 1/steps) with the static shift (diffusers' default grid)."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return shift_sigmas(s, shift).tolist()


@torch.no_grad()
def euler_loop(model_fn: Callable, x: torch.Tensor, sigmas: Sequence[float],
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Euler over `sigmas` (a terminal 0 is appended if missing). `on_step(i)` runs before step i (adapter switch)."""
    sigmas = list(sigmas) + ([] if sigmas[-1] == 0 else [0.0])
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


def run_info(directory: str) -> dict:
    """The `fewstep_run.json` the trainer writes beside each export (config, trained sigmas, phase)."""
    import json
    import os

    path = os.path.join(directory, "fewstep_run.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no fewstep_run.json: is it a fewstep output directory?")
    with open(path) as fh:
        return json.load(fh)


def glance_pipeline_sample(pipe, prompt_kwargs: dict, slow_dir: str, fast_dir: str, slow: Sequence[float],
                           fast: Sequence[float], *, num_inference_steps: int | None = None, **call_kwargs):
    """Glance inference with ONE stock diffusers pipeline: Slow LoRA for its sigmas, then Fast from where Slow stopped.

    The schedule is exactly slow + fast (+ the terminal 0 the pipeline appends); the Slow phase ends at the first Fast
    sigma instead of denoising to 0, and the scheduler must not shift custom sigmas (the caller's pipeline uses a
    FlowMatchEulerDiscreteScheduler without dynamic shifting). The active adapter switches after the last Slow step.
    """
    from fewstep.methods.glance import glance_schedule

    sigmas, boundary = glance_schedule(slow, fast)
    steps = len(sigmas) - 1
    if num_inference_steps is not None and num_inference_steps != steps:
        raise ValueError(f"num_inference_steps={num_inference_steps} must equal the Slow+Fast list length ({steps})")
    pipe.load_lora_weights(slow_dir, adapter_name="slow")
    pipe.load_lora_weights(fast_dir, adapter_name="fast")
    pipe.set_adapters("slow")

    def switch(p, i, t, kwargs):
        if i == boundary - 1:
            p.set_adapters("fast")
        return kwargs

    return pipe(**prompt_kwargs, sigmas=sigmas[:-1], num_inference_steps=steps, callback_on_step_end=switch,
                **call_kwargs)
