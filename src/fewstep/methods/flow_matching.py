"""Rectified-flow training maths: sigma sampling, shifts and the flow-matching loss.

Convention (diffusers' flow models): x_sigma = (1 - sigma) * x0 + sigma * noise, sigma = 1 is pure noise, and the
model predicts the velocity v = noise - x0.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .transfer import copy_to


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Static timestep shift s * sigma / (1 + (s - 1) * sigma); s > 1 spends more time near noise."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift (Flux's rule): mu linear in the image token count, shift = exp(mu).

    Flux's `time_shift(mu, 1, sigma) = e^mu / (e^mu + 1/sigma - 1)` is exactly the static shift with s = e^mu.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + m * (image_seq_len - base_seq_len)
    return math.exp(mu)


def schedule_shift(latent_height: int, latent_width: int, static: float, auto: bool) -> float:
    """The shift a flow-matching run trains and samples with: Flux's resolution rule when `auto` (the image tokens of
    2x2 latent patches), else the static shift."""
    return resolution_shift(latent_height * latent_width // 4) if auto else static


def sample_sigmas(batch: int, *, uniform: bool = False, logit_mean: float = 0.0, logit_std: float = 1.0,
                  shift: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Training sigmas in (0, 1): logit-normal (SD3 paper) or uniform, then the shift."""
    if uniform:
        sigma = torch.rand(batch, generator=generator)
    else:
        sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    return shift_sigmas(sigma, shift)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise, with per-sample sigma."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def flow_matching_loss(model: Callable, x0: torch.Tensor, sigma: torch.Tensor, cond,
                       noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
    """Mean-squared error between model(x_sigma, sigma, cond) and the velocity target noise - x0.

    Returns (loss, prediction). The loss is computed in fp32 whatever the model's dtype.
    """
    if noise is None:  # drawn on the host (the same noise on any device), copied without waiting for the device
        noise = copy_to(torch.randn(x0.shape, generator=generator, dtype=torch.float32), x0.device, x0.dtype)
    sigma = copy_to(sigma, x0.device)
    pred = model(noisy_latents(x0, noise, sigma), sigma, cond)
    target = noise.float() - x0.float()  # the exact difference of the bf16 values (bf16 rounds it to ~3 digits)
    return torch.mean((pred.float() - target) ** 2), pred
