"""The diffusion base of a `TwinFlowScheduler` that samples an epsilon- or v-prediction model (e.g. SDXL's UNet).

Only the base's noise table is built here, from diffusers' standard DDPM config keys, exactly as diffusers' own
schedulers (DDPM / DDIM / EulerDiscrete) build it (float32 betas, `alphas_cumprod = cumprod(1 - betas)`). All bridge
maths (input scale, timestep, output conversion) lives in `fewstep.methods.diff2flow`.
"""
from __future__ import annotations

import torch

DIFFUSION_PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def diffusion_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                             beta_schedule: str = "linear", trained_betas=None,
                             rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """`alphas_cumprod` [num_train_timesteps] (float32) of a diffusers DDPM-style config, as diffusers computes it.

    `trained_betas` (if given) override the schedule. `rescale_betas_zero_snr` follows EulerDiscreteScheduler: the
    zero-terminal-SNR rescale, with the last `alphas_cumprod` set to 2**-24 so that the table stays usable. Built on
    the CPU whatever the default device (the planner builds adapters under `torch.device("meta")`).
    """
    with torch.device("cpu"):
        return _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                               rescale_betas_zero_snr)


def _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr):
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32).reshape(-1)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise ValueError(f"TwinFlowScheduler: beta_schedule={beta_schedule!r}, expected one of {BETA_SCHEDULES} "
                         "(or trained_betas)")
    if rescale_betas_zero_snr:
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2**-24
    if alphas_cumprod.numel() < 2 or not bool(((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all()) \
            or not bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all()):
        raise ValueError("TwinFlowScheduler: the betas (beta_start / beta_end / beta_schedule / trained_betas) must "
                         "give a strictly decreasing alphas_cumprod in (0, 1] with >= 2 entries")
    return alphas_cumprod


def alphas_cumprod_from_config(config) -> torch.Tensor:
    """`diffusion_alphas_cumprod` of a diffusers scheduler config (a folder's scheduler_config.json or `.config`),
    with diffusers' defaults for missing keys."""
    get = config.get
    return diffusion_alphas_cumprod(get("num_train_timesteps", 1000), get("beta_start", 0.0001),
                                    get("beta_end", 0.02), get("beta_schedule", "linear"), get("trained_betas"),
                                    get("rescale_betas_zero_snr", False))
