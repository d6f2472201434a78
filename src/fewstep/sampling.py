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
