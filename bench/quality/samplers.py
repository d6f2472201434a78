"""Sampling every benchmark row through the stock diffusers `FluxPipeline`, loaded with `from_pretrained`.

Each function takes cached prompt embeddings `cond` (batch N, one row per sample), start noise [N, 1, 8, 8] (the
latent shape) and returns grey pixels [N, 16, 16] in [-1, 1] (decoded by the pipeline's own VAE). The same noise is
used for every row, so rows differ only in the model and the sampler.
"""
from __future__ import annotations

import os

import torch

from fewstep.models import anystep, get_adapter

ADAPTER = get_adapter("flux")


def load(pipeline_dir: str, transformer_dir: str | None = None, scheduler=None):
    """Components and a pipeline (fp32, eval mode); `transformer_dir` replaces the transformer (a full fine-tune)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    comps = ADAPTER.load(pipeline_dir, with_text=False)
    if transformer_dir is not None:
        comps.denoiser = ADAPTER.denoiser_cls.from_pretrained(transformer_dir)
    comps.denoiser.eval()
    # shift 1, no dynamic shift: the sigmas we pass are used verbatim (plus the terminal 0)
    pipe = ADAPTER.build_pipeline(comps, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=1.0))
    return comps, pipe


@torch.no_grad()
def run_pipeline(comps, pipe, cond: dict, noise: torch.Tensor, negative: dict | None = None, **kwargs):
    """pipe(...) from cached embeddings and given start latents -> grey pixels [N, 16, 16]."""
    out = pipe(**ADAPTER.pipeline_prompt_kwargs(cond, negative), output_type="latent",
               **ADAPTER.pipeline_latent_kwargs(comps, noise), **kwargs).images
    latents = ADAPTER.latents_from_pipeline(out, *noise.shape[-2:])
    return ADAPTER.decode_latents(comps.vae, latents).mean(1)


def euler(pipeline_dir: str, cond: dict, noise: torch.Tensor, sigmas: list[float], *,
          transformer_dir: str | None = None, negative: dict | None = None, cfg_scale: float = 1.0):
    """Plain Euler over `sigmas` (diffusers' FlowMatchEulerDiscreteScheduler); optional true CFG with `negative`."""
    comps, pipe = load(pipeline_dir, transformer_dir)
    extra = {"true_cfg_scale": cfg_scale} if negative is not None else {}
    return run_pipeline(comps, pipe, cond, noise, negative, sigmas=list(sigmas), num_inference_steps=len(sigmas),
                        **extra)


def twinflow(pipeline_dir: str, run_dir: str, cond: dict, noise: torch.Tensor, steps: int, *, seed: int = 0,
             full: bool = False, anystep_embeddings: bool = True, **sampler):
    """TwinFlow any-step sampling (UCGM) as `launcher/sample.py` does it: `twinflow_preset(steps)`, with `sampler`
    overriding TwinFlowScheduler settings (target_time, stochastic_ratio, gap_end, kumaraswamy).

    LoRA runs: `load_lora_weights(run_dir)`; full runs: the transformer from `run_dir/transformer`. The any-step
    embeddings load from beside the weights; t and tt come from the scheduler's current step, sign +1. The
    scheduler's re-noising draws from the global RNG, seeded here. `anystep_embeddings` False: the weights alone, as
    a stock pipeline or ComfyUI runs them (the ablation of `sampler_modes.py --without-anystep`).
    """
    from fewstep.schedulers.twinflow import twinflow_sampler

    tdir = os.path.join(run_dir, "transformer") if full else None
    sched = twinflow_sampler(steps, **sampler)
    comps, pipe = load(pipeline_dir, tdir, sched)
    if not full:
        pipe.load_lora_weights(run_dir)
    torch.manual_seed(seed)
    if not anystep_embeddings:
        return run_pipeline(comps, pipe, cond, noise, num_inference_steps=steps)
    ADAPTER.add_anystep(pipe.transformer)
    anystep.load_anystep(pipe.transformer, tdir or run_dir)
    with anystep.anystep_state(pipe.transformer, sign=1.0, scheduler=pipe.scheduler):
        return run_pipeline(comps, pipe, cond, noise, num_inference_steps=steps)


def glance(pipeline_dir: str, slow_dir: str, fast_dir: str, cond: dict, noise: torch.Tensor):
    """Glance: one pipeline, Slow LoRA over its sigmas, then the Fast LoRA from where Slow stopped (no shift)."""
    from fewstep.sampling import glance_pipeline_sample, run_info

    comps, pipe = load(pipeline_dir)
    slow, fast = run_info(slow_dir)["sigmas"], run_info(fast_dir)["sigmas"]
    out = glance_pipeline_sample(pipe, ADAPTER.pipeline_prompt_kwargs(cond), slow_dir, fast_dir, slow, fast,
                                 output_type="latent", **ADAPTER.pipeline_latent_kwargs(comps, noise)).images
    latents = ADAPTER.latents_from_pipeline(out, *noise.shape[-2:])
    return ADAPTER.decode_latents(comps.vae, latents).mean(1)
