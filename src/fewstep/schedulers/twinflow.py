"""TwinFlowScheduler: the UCGM few-step sampler (arXiv:2505.07447) as a diffusers scheduler.

Conventions (the same as diffusers' flow-matching models, FLUX / SD3 / Qwen-Image):
    x_sigma = sigma * z + (1 - sigma) * x          z noise, x data, sigma = 1 is pure noise
    model output F = z - x                          ("flow_matching": the velocity points from data to noise)
    timesteps = sigma * num_train_timesteps         Flux / Qwen pipelines divide by 1000, SD3 feeds them as is
A model trained to output the data-ward velocity x - z is supported by `prediction_type="flow_matching_reversed"`
(the output is negated before the step).

Step rule from sigma_i to sigma_{i+1}, with stochasticity s = `stochastic_ratio` and fresh noise eps:
    x_hat = x - sigma_i * F                         predicted data
    z_hat = x + (1 - sigma_i) * F                   predicted noise
    x'    = (1 - sigma_{i+1}) * x_hat + sigma_{i+1} * (sqrt(1 - s) * z_hat + sqrt(s) * eps)
s = 0 is exactly Euler, x' = x + (sigma_{i+1} - sigma_i) * F; s = 1 re-noises the predicted data with fresh noise.

Grid for N steps (`set_timesteps(N)`): u = linspace(gap_start, 1 - gap_end, N) (gap_end = 0: N + 1 points, drop the
last), Kumaraswamy warp u <- (1 - (1 - u^a)^b)^c, sigma = 1 - u, then the diffusers shift (static `shift`, or the
dynamic exponential/linear shift with `mu` when `use_dynamic_shifting`), the optional `shift_terminal` stretch, and a
terminal 0. gap_end=None picks the reference presets: 0.6 for N <= 2, 0.5 for N <= 4, 0.3 above.

Diffusion bases. With `prediction_type="epsilon"` or `"v_prediction"` the scheduler drives a diffusion model (e.g.
SDXL's UNet in a stock `StableDiffusionXLPipeline`) through the diff2flow bridge (`fewstep.methods.diff2flow`, the
same functions the training code uses). The base's `alphas_cumprod` comes from diffusers' DDPM config keys
(`beta_start`, `beta_end`, `beta_schedule`, `trained_betas`, `rescale_betas_zero_snr`), so
`TwinFlowScheduler.from_config(pipe.scheduler.config, **twinflow_preset(n))` works on an Euler / DDPM / DDIM config.
The grid, `sigmas` and `target_times()` stay flow sigmas (step 0 starts at pure noise, `init_noise_sigma` = 1);
`timesteps` are the base's continuous timesteps `bridge_timestep(sigmas[:-1])`, `scale_model_input` maps the flow state
to the base's input (`flow_to_diffusion_input`) and `step` converts the output to the flow velocity
(`bridge_velocity`, fp64) before the step rule. Outside the base's sigma range the bridge's documented rule applies (a
one-step sample from pure noise is the base's DDIM x0 estimate). Clamped timesteps may repeat (e.g. 999 for sigmas
0.999 and 0.95 on SDXL): the step index is counted per `step`, and a repeated timestep maps to its first step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from fewstep.methods.diff2flow import bridge_timestep, bridge_velocity, flow_to_diffusion_input, timestep_to_sigma

from .diffusion_base import DIFFUSION_PREDICTION_TYPES, diffusion_alphas_cumprod

PREDICTION_TYPES = ("flow_matching", "flow_matching_reversed") + DIFFUSION_PREDICTION_TYPES
TARGET_TIMES = ("few", "any", "mul")
SIGMAS_POLICIES = ("auto", "always", "ignore")


@dataclass
class TwinFlowSchedulerOutput(BaseOutput):
    """Output of `TwinFlowScheduler.step`: `prev_sample` is the sample at the next (lower) sigma."""

    prev_sample: torch.Tensor


def default_gap_end(num_steps: int) -> float:
    """The reference end gap g1 for `num_steps` steps: 0.6 (N <= 2), 0.5 (N <= 4), else 0.3."""
    return 0.6 if num_steps <= 2 else 0.5 if num_steps <= 4 else 0.3


# The sampler per step count (NFE), as `launcher/sample.py`, validation and the quality benchmark use it: the best of
# every mode measured on the digits benchmark (bench/quality/RESULTS.md, "TwinFlow sampler modes"). Target time "any"
# (tt = the next sigma) without re-noising (s = 0), the reference's end gaps: at 2, 4 and 8 NFE it is the best or
# within the noise-draw spread of the best for the LoRA and the full fine-tune, and more steps are never worse. The
# reference's own few-step preset (few, s = 1: the class defaults) is flat or worse with more steps there. At 1 NFE
# every mode but "mul" is the same step.
PRESETS = {1: dict(target_time="any", stochastic_ratio=0.0, gap_end=None, kumaraswamy=(1.0, 1.0, 1.0))}


# The grid TwinFlow trains on: t uniform in [0, 1], no shift. A stock pipeline's scheduler config carries its base's
# shift (FLUX: dynamic; SD3: 3.0; Qwen-Image: dynamic and shift_terminal 0.02), which `from_config` would keep:
# Qwen-Image's shift_terminal alone moves a 1-step sample's only sigma from 0.999 to 0.02.
TRAINING_GRID = dict(shift=1.0, use_dynamic_shifting=False, shift_terminal=None)


def twinflow_preset(num_steps: int) -> dict:
    """TwinFlowScheduler settings for `num_steps` steps: the training grid (no shift) and the sampler preset of the
    largest listed count <= num_steps. `TwinFlowScheduler.from_config(pipe.scheduler.config, **twinflow_preset(n))`
    keeps only the base's own keys (its betas, for a diffusion base)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return {**TRAINING_GRID, **PRESETS[max(n for n in PRESETS if n <= num_steps)]}


def ucgm_sigmas(num_steps: int, gap_start: float = 0.001, gap_end: float | None = None,
                kumaraswamy=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The N non-terminal UCGM sigmas (float64, decreasing), before any shift and without the terminal 0."""
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}")
    g0 = float(gap_start)
    g1 = default_gap_end(num_steps) if gap_end is None else float(gap_end)
    if not 0.0 <= g0 < 1.0 - g1 <= 1.0:
        raise ValueError(f"gaps must satisfy 0 <= gap_start < 1 - gap_end <= 1, got gap_start={g0}, gap_end={g1}")
    if g1 == 0.0:  # the grid reaches u = 1 (sigma = 0): take N + 1 points and drop the last
        u = np.linspace(g0, 1.0, num_steps + 1, dtype=np.float64)[:-1]
    else:
        u = np.linspace(g0, 1.0 - g1, num_steps, dtype=np.float64)
    a, b, c = (float(k) for k in kumaraswamy)
    u = (1.0 - (1.0 - u**a) ** b) ** c
    return 1.0 - u


class TwinFlowScheduler(SchedulerMixin, ConfigMixin):
    """UCGM sampler for TwinFlow any-step models, usable as `pipe.scheduler` in Flux / SD3 / Qwen-Image pipelines.

    `sigmas_policy` decides what happens to `sigmas=` passed to `set_timesteps`. Flux and Qwen-Image pipelines always
    pass `linspace(1, 1/N, N)`, with `mu`, when their caller gave none; "auto" (default) replaces exactly that default
    grid passed with `mu` by the UCGM grid and uses any other sigmas verbatim (shifted like diffusers does; SD3 and
    SDXL pipelines pass no `mu` and no default grid, so a caller's grid there is always theirs); "always" uses given
    sigmas verbatim; "ignore" always uses the UCGM grid.

    `prediction_type` "epsilon" / "v_prediction" samples a diffusion model whose noise table is given by the diffusers
    DDPM keys `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`, `rescale_betas_zero_snr` (module docstring);
    other keys of a diffusers scheduler config are ignored by `from_config`.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        prediction_type: str = "flow_matching",
        shift: float = 1.0,
        stochastic_ratio: float = 1.0,
        gap_start: float = 0.001,
        gap_end: float | None = None,
        kumaraswamy: tuple = (1.0, 1.0, 1.0),
        target_time: str = "few",
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        sigmas_policy: str = "auto",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list | None = None,
        rescale_betas_zero_snr: bool = False,
    ):
        checks = [("prediction_type", prediction_type, PREDICTION_TYPES), ("target_time", target_time, TARGET_TIMES),
                  ("sigmas_policy", sigmas_policy, SIGMAS_POLICIES),
                  ("time_shift_type", time_shift_type, ("exponential", "linear"))]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"TwinFlowScheduler: {key}={value!r}, expected one of {allowed}")
        if not 0.0 <= stochastic_ratio <= 1.0:
            raise ValueError(f"TwinFlowScheduler: stochastic_ratio={stochastic_ratio}, expected a value in [0, 1]")
        if len(kumaraswamy) != 3 or min(kumaraswamy) <= 0:
            raise ValueError(f"TwinFlowScheduler: kumaraswamy={kumaraswamy!r}, expected three positive numbers "
                             "(a, b, c)")
        if shift <= 0:
            raise ValueError(f"TwinFlowScheduler: shift={shift}, expected > 0")
        self.init_noise_sigma = 1.0
        # The diffusion base's noise table (float32, as diffusers' schedulers); None for flow models.
        self.alphas_cumprod = (diffusion_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                        trained_betas, rescale_betas_zero_snr)
                               if self.is_diffusion else None)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._shift = float(shift)
        # Until set_timesteps runs: the full training grid, like diffusers' flow-matching schedulers.
        sig = np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=np.float64)
        if not use_dynamic_shifting:  # the dynamic shift needs mu, known only at set_timesteps
            sig = self._shift * sig / (1 + (self._shift - 1) * sig)
        self.sigmas = torch.from_numpy(np.append(sig, 0.0))
        self.timesteps = self._timesteps_for(self.sigmas)
        self.sigma_max, self.sigma_min = float(self.sigmas[0]), float(self.sigmas[-2])

    # -- attributes and helpers the diffusers pipelines use --------------------------------------------------------
    @property
    def shift(self) -> float:
        """The static shift in use (`set_shift` changes it)."""
        return self._shift

    @property
    def is_diffusion(self) -> bool:
        """Whether the model is an epsilon / v-prediction diffusion model sampled through the diff2flow bridge."""
        return self.config.prediction_type in DIFFUSION_PREDICTION_TYPES

    def _timesteps_for(self, sigmas: torch.Tensor) -> torch.Tensor:
        # What the pipeline hands the model (float32): sigma * T for flow models, the bridge timestep for diffusion.
        if self.is_diffusion:
            return bridge_timestep(sigmas[:-1], self.alphas_cumprod).to(dtype=torch.float32)
        return (sigmas[:-1] * self.config.num_train_timesteps).to(dtype=torch.float32)

    @property
    def step_index(self):
        """Index of the next step; None until the first `step` (or `set_begin_index`)."""
        return self._step_index

    @property
    def begin_index(self):
        """First step index, set by the pipeline through `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the next run at step `begin_index` (pipelines call it with 0 before the loop)."""
        self._begin_index = begin_index

    def set_shift(self, shift: float):
        """Change the static shift used by the next `set_timesteps`."""
        self._shift = float(shift)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        """Dynamic (resolution-dependent) shift, as diffusers' FlowMatchEulerDiscreteScheduler."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def _apply_shift(self, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
        # Static shift sigma' = k sigma / (1 + (k - 1) sigma), or the dynamic shift with mu; then shift_terminal.
        if self.config.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if self.config.shift_terminal:
            one_minus = 1.0 - sigmas
            sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - self.config.shift_terminal))
        return sigmas

    # -- schedule ---------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        """Build the sampling schedule (float64 sigmas with a terminal 0, timesteps = sigma * num_train_timesteps).

        `sigmas` follow `sigmas_policy`; explicit `timesteps` are used as given (sigma = timesteps / T, no shift; for
        diffusion types they are the base's timesteps and sigma is their flow sigma, `timestep_to_sigma`).
        Diffusion types: timesteps = `bridge_timestep(sigmas[:-1])`.
        `mu` is required and used only when `config.use_dynamic_shifting` (as in diffusers).
        """
        T = self.config.num_train_timesteps
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("TwinFlowScheduler.set_timesteps: `mu` must be passed when use_dynamic_shifting=True")
        if sigmas is not None and timesteps is not None:
            raise ValueError("TwinFlowScheduler.set_timesteps: pass either `sigmas` or `timesteps`, not both")
        given = sigmas if sigmas is not None else timesteps
        if given is not None:
            given = np.asarray(given.cpu() if torch.is_tensor(given) else given, dtype=np.float64).reshape(-1)
            if num_inference_steps is not None and len(given) != num_inference_steps:
                raise ValueError(f"TwinFlowScheduler.set_timesteps: got {len(given)} sigmas/timesteps but "
                                 f"num_inference_steps={num_inference_steps}; they must agree")
            num_inference_steps = len(given)
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"TwinFlowScheduler.set_timesteps: num_inference_steps={num_inference_steps}, expected "
                             ">= 1 (or non-empty sigmas/timesteps)")
        if timesteps is not None:
            sig = timestep_to_sigma(torch.from_numpy(given), self.alphas_cumprod).numpy() if self.is_diffusion \
                else given / T
        elif sigmas is not None and self._use_given_sigmas(given, mu):
            sig = self._apply_shift(given, mu)
        else:
            cfg = self.config
            sig = self._apply_shift(ucgm_sigmas(num_inference_steps, cfg.gap_start, cfg.gap_end, cfg.kumaraswamy), mu)
        if np.any(~np.isfinite(sig)) or np.any(sig <= 0) or np.any(sig > 1) or np.any(np.diff(sig) >= 0):
            raise ValueError(f"TwinFlowScheduler.set_timesteps: sigmas {sig.tolist()} must be strictly decreasing "
                             "in (0, 1]")
        self.num_inference_steps = num_inference_steps
        self.sigmas = torch.from_numpy(np.append(sig, 0.0)).to(device=device)
        self.timesteps = self._timesteps_for(self.sigmas)
        self._step_index = None
        self._begin_index = None

    def _use_given_sigmas(self, sigmas: np.ndarray, mu) -> bool:
        policy = self.config.sigmas_policy
        if policy != "auto":
            return policy == "always"
        # The default grid Flux / Qwen-Image pipelines pass (always with mu) when their caller gave no sigmas.
        pipeline_default = np.linspace(1.0, 1.0 / len(sigmas), len(sigmas))
        return mu is None or not np.allclose(sigmas, pipeline_default, rtol=0, atol=1e-6)

    def target_times(self) -> torch.Tensor:
        """Target time tt (in sigma units, float64) for each step of the current schedule, for any-step models.

        "few": tt = 0 (jump to data, then re-noise), "any": tt = sigma_{i+1}, "mul": tt = sigma_i (flow matching).
        """
        sig = self.sigmas
        mode = self.config.target_time
        if mode == "few":
            return torch.zeros_like(sig[:-1])
        return sig[1:].clone() if mode == "any" else sig[:-1].clone()

    # -- sampling ---------------------------------------------------------------------------------------------------
    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Index of `timestep` in the schedule (the second match if it occurs twice, as diffusers; the first for
        diffusion types, whose repeats come from clamping at the base's range ends, e.g. the first steps from noise)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep, device=schedule_timesteps.device, dtype=schedule_timesteps.dtype)
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"TwinFlowScheduler: timestep {float(timestep)} is not in the schedule "
                             f"{schedule_timesteps.tolist()}; pass one of scheduler.timesteps")
        return indices[1 if len(indices) > 1 and not self.is_diffusion else 0].item()

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model input for the current step: `sample` itself for flow models; for diffusion types the base's input
        `flow_to_diffusion_input(sample, sigma_i)` (this starts the step count, like diffusers' Euler)."""
        if not self.is_diffusion:
            return sample
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index].reshape(1).to(sample.device)
        return flow_to_diffusion_input(sample, sigma)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward process x_sigma = sigma * noise + (1 - sigma) * sample at `timestep` (img2img / inpaint)."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if self.begin_index is None:
            idx = [self.index_for_timestep(t, self.timesteps.to(sample.device)) for t in timestep]
        else:
            idx = [self.step_index if self.step_index is not None else self.begin_index] * timestep.shape[0]
        sigma = sigmas[idx].reshape(-1, *([1] * (sample.ndim - 1)))
        return sigma * noise + (1.0 - sigma) * sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """`scale_noise` with diffusers' DDPM-style argument order (SDXL img2img): the flow state at `timesteps`."""
        return self.scale_noise(original_samples, timesteps, noise)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        """One UCGM step from sigmas[i] to sigmas[i + 1] (see the module docstring), computed in float64.

        `model_output` is the velocity z - x (noise minus data), or for diffusion types the base's epsilon / v output
        at `scale_model_input(sample)`, converted by `bridge_velocity`. Noise for s > 0 comes from `generator`, or the
        global RNG when None (diffusers pipelines pass none). Returns `prev_sample` in the dtype of `sample`.
        """
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("TwinFlowScheduler.step: pass one of scheduler.timesteps as `timestep`, not an integer "
                             "index")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.sigmas) - 1:
            raise ValueError(f"TwinFlowScheduler.step: step index {self._step_index} is past the last of "
                             f"{len(self.sigmas) - 1} steps; call set_timesteps again")
        sigma = self.sigmas[self._step_index].to(sample.device)
        sigma_next = self.sigmas[self._step_index + 1].to(sample.device)
        x = sample.to(torch.float64)
        if self.is_diffusion:
            F = bridge_velocity(model_output.to(torch.float64), x, sigma.reshape(1), self.alphas_cumprod,
                                self.config.prediction_type)
        else:
            F = model_output.to(torch.float64)
        if self.config.prediction_type == "flow_matching_reversed":
            F = -F
        x_hat = x - sigma * F
        z_hat = x + (1.0 - sigma) * F
        s = float(self.config.stochastic_ratio)
        if s > 0.0:
            eps = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            z_hat = math.sqrt(1.0 - s) * z_hat + math.sqrt(s) * eps.to(torch.float64)
        prev = (1.0 - sigma_next) * x_hat + sigma_next * z_hat
        self._step_index += 1
        prev = prev.to(sample.dtype)
        return TwinFlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def twinflow_sampler(num_steps: int, base_config=None, prediction_type: str = "flow_matching",
                     **settings) -> TwinFlowScheduler:
    """The scheduler fewstep samples `num_steps` NFE with (validation, `launcher/sample.py`, the quality bench): the
    preset (`twinflow_preset`) with `settings` over it. `base_config`: a diffusion base's scheduler config (its betas,
    for `prediction_type` 'epsilon' / 'v_prediction'); none for a flow model."""
    settings = {**twinflow_preset(num_steps), **settings}
    if base_config is not None:
        return TwinFlowScheduler.from_config(base_config, prediction_type=prediction_type, **settings)
    return TwinFlowScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **settings)
