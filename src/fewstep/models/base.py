"""The model-family adapter: everything fewstep needs to know about one diffusers flow-matching family.

A `FlowModelAdapter` subclass declares a family's classes and conventions as data (component classes, LoRA targets,
time scale, latent packing) and overrides a handful of small hooks (`_encode_prompt_batch`, `_call_transformer`,
VAE normalisation). Everything shared - loading, prompt/image encoding, packing, the forward call, stock pipelines -
is written once here; batching cached conditioning (`collate_cond`, `split_cond`): `fewstep.models.cond_batches`.

Flow-matching convention (diffusers): x_sigma = (1 - sigma) * x + sigma * noise, and the transformer predicts the
velocity v = noise - x, so an Euler step is x <- x + (sigma_next - sigma) * v.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fewstep.errors import ModelFamilyError
from fewstep.models import anystep, attention, cond_batches
from fewstep.models.registry import adapter_classes, canonical_family
from fewstep.models.source import check_denoiser_class, resolve_folder_or_hub

@dataclass
class ModelComponents:
    """What `FlowModelAdapter.load` returns. Missing parts (with_text=False, ...) are None or empty lists."""

    denoiser: nn.Module | None  # what training tunes: the transformer (flow families) or the UNet (diffusion families)
    vae: nn.Module | None
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    scheduler: Any = None
    source: str = ""  # the local directory or hub id the components came from


def unwrap(model: nn.Module) -> nn.Module:
    """The bare diffusers model behind a DeepSpeed engine (or similar `.module` wrapper)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


class FlowModelAdapter:
    """Shared adapter logic; subclasses set the class attributes below and override the `_`-prefixed hooks."""

    family: str = ""
    config_name: str = ""  # model_family as configs spell it, where that is not `family` ("qwen_image")
    aliases: tuple[str, ...] = ()
    pipeline_cls: type = None
    denoiser_cls: type = None  # the diffusers model class training tunes (a transformer or a UNet)
    denoiser_subfolder: str = "transformer"  # its pipeline component name = subfolder (also in full exports)
    scheduler_cls: type = None  # the folder's scheduler class (None: FlowMatchEulerDiscreteScheduler)
    lora_layers_kwarg: str = "transformer_lora_layers"  # pipeline_cls.save_lora_weights' argument for the denoiser
    anystep_module: str = "time_text_embed"  # the denoiser's time-embedding module the any-step hook adds to
    vae_cls: type = None
    # (subfolder, class) for each text encoder, in the pipeline's order; tokenizers load with AutoTokenizer
    text_encoder_specs: tuple[tuple[str, type], ...] = ()
    tokenizer_subfolders: tuple[str, ...] = ()
    default_lora_targets: tuple[str, ...] = ()
    cond_keys: tuple[str, ...] = ()  # keys encode_prompts returns and forward needs
    # anystep_module's first argument = hook_time_scale * sigma; None: that argument is not the timestep (SDXL's
    # time_embedding gets its sinusoid), so t comes from the any-step state
    hook_time_scale: float | None = 1000.0
    packed: bool = False  # True: latents enter the transformer as 2x2-patch tokens [B, h*w/4, 4C]
    default_guidance: float = 1.0  # distilled-guidance value when the transformer has guidance_embeds
    distilled_guidance: bool = False  # "guidance" means that embedding's value (FLUX.1-dev), not a CFG scale
    cfg_scale_kwarg: str = "guidance_scale"  # the pipeline argument scaling classifier-free guidance
    sample_cfg_scale: float = 1.0  # CFG its multi-step samples take by default (1: none)
    default_text_len: int = 512  # the pipeline __call__ default max_sequence_length (long text encoder)
    diffusion_base: bool = False  # an epsilon/v-prediction model that `forward` bridges to flow (diff2flow)
    # The timestep as the stock pipeline makes it: FLUX's and Qwen-Image's cast the scheduler's t = 1000 sigma to the
    # latents' dtype and divide by 1000 there (bf16: 1000 sigma on a grid of 4 near 1000); SD3's passes t in fp32.
    # Training feeds the model the same value (`pipeline_timestep`).
    timestep_in_model_dtype: bool = True
    # Where the family is fixed and the base model is chosen with a command-line option (sample.py: '--model', the
    # run's family), that option: a base model of another family is then fixed with it, not with model_family.
    model_option: str | None = None

    # ------------------------------------------------------------------ loading
    def load(self, name_or_path: str, *, dtype: torch.dtype = torch.float32, with_text: bool = True,
             with_vae: bool = True, with_denoiser: bool = True) -> ModelComponents:
        """Load a diffusers-layout model (local dir, hub id or `tiny:<family>`) with `from_pretrained`.

        Text encoders and the VAE are put in eval mode with gradients off; the denoiser is returned as loaded
        (eval mode, gradients on) for the trainer to configure.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer

        src = self.resolve(name_or_path)
        denoiser = vae = None
        if with_denoiser:
            denoiser = self.denoiser_cls.from_pretrained(src, subfolder=self.denoiser_subfolder, torch_dtype=dtype)
        if with_vae:
            vae = self.vae_cls.from_pretrained(src, subfolder="vae", torch_dtype=dtype).eval().requires_grad_(False)
        text_encoders, tokenizers = [], []
        if with_text:
            for sub, cls in self.text_encoder_specs:
                text_encoders.append(cls.from_pretrained(src, subfolder=sub, dtype=dtype).eval().requires_grad_(False))
            tokenizers = [AutoTokenizer.from_pretrained(src, subfolder=sub) for sub in self.tokenizer_subfolders]
        scheduler = (self.scheduler_cls or FlowMatchEulerDiscreteScheduler).from_pretrained(src, subfolder="scheduler")
        return ModelComponents(denoiser, vae, text_encoders, tokenizers, scheduler, source=src)

    def use_prediction_type(self, prediction_type: str, source: str) -> str | None:
        """Use the config's `prediction_type` for this base model (from `source`); returns a warning to log, or None.
        Flow families predict the velocity: nothing to set (the config allows them only 'flow_matching')."""
        return None

    def resolve(self, name_or_path: str) -> str:
        """Map a user's model name to something `from_pretrained` can open without hanging.

        `tiny:<family>` -> the cached tiny pipeline (built on first use); an existing directory -> itself; a hub id
        -> itself if it is in the HF cache or the hub answers within seconds (`fewstep.models.source`). Anything
        else raises a clear error.
        """
        name = str(name_or_path)
        if name.startswith("tiny:"):
            fam = name[len("tiny:"):]
            if canonical_family(fam) != self.family:
                raise ModelFamilyError(self._tiny_mismatch(name, fam))
            from fewstep.models.tiny import ensure_tiny_pipeline
            return str(ensure_tiny_pipeline(self.family))
        src = resolve_folder_or_hub(name, self.denoiser_subfolder)
        families = {cls.denoiser_cls.__name__: cls.family for cls in adapter_classes()}
        check_denoiser_class(name, src, self.denoiser_subfolder, self.denoiser_cls.__name__, self.family, families,
                             model_option=self.model_option)
        return src

    def _tiny_mismatch(self, name: str, fam: str) -> str:
        """Why `tiny:<fam>` (`name`) is no model for this family, and the fix: the matching tiny model, or (in a
        training config) model_family `fam` where fewstep has that family."""
        known = canonical_family(fam) in {cls.family for cls in adapter_classes()}
        shown = sorted({cls.config_name or cls.family for cls in adapter_classes()})
        what = f"{name!r} is a {fam!r} model" if known else \
            f"{name!r} names no model family (fewstep has {', '.join(shown)})"
        me = self.config_name or self.family
        if self.model_option is not None:
            return f"{what}, but the run trained a {me!r} model: use {self.model_option} tiny:{me}"
        if known:
            return f"{what}, but model_family is {me!r}: use 'tiny:{me}', or set model_family {fam!r}"
        return f"{what}: for model_family {me!r} use 'tiny:{me}'"

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, comps: ModelComponents, prompts: list[str], *,
                       max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """Encode captions with the family pipeline's own `encode_prompt`; returns batch-first tensors.

        max_sequence_length: the long text encoder's token budget; None: the pipeline's default, capped at the
        last tokenizer's model_max_length (which is how tiny pipelines get short, fast text).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        if not comps.text_encoders or not comps.tokenizers:
            raise ValueError("encode_prompts needs text encoders and tokenizers: load with with_text=True")
        pipe = self.pipeline_cls(**{self.denoiser_subfolder: comps.denoiser}, vae=comps.vae,
                                 scheduler=comps.scheduler, **self._text_kwargs(comps))
        if max_sequence_length is None:
            max_sequence_length = min(self.default_text_len, comps.tokenizers[-1].model_max_length)
        return self._encode_prompt_batch(pipe, list(prompts), max_sequence_length=max_sequence_length)

    def _encode_prompt_batch(self, pipe, prompts: list[str], **kwargs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _text_kwargs(self, comps: ModelComponents) -> dict[str, Any]:
        """Pipeline constructor kwargs for text encoders/tokenizers (None when not loaded)."""
        enc_names = [sub for sub, _ in self.text_encoder_specs]
        out = {name: None for name in (*enc_names, *self.tokenizer_subfolders)}
        if comps.text_encoders:
            out.update(zip(enc_names, comps.text_encoders))
        if comps.tokenizers:
            out.update(zip(self.tokenizer_subfolders, comps.tokenizers))
        return out

    # ------------------------------------------------------------------ images
    def vae_scale_factor(self, vae: nn.Module) -> int:
        """Spatial downsampling factor of the VAE (AutoencoderKL: 2 ** (levels - 1))."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def patch_factor(self, transformer: nn.Module | None) -> int:
        """Spatial factor the transformer consumes on top of the VAE's (2 for 2x2 packing)."""
        return 2

    @torch.no_grad()
    def encode_images(self, vae: nn.Module, pixels: torch.Tensor, *, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels [B,3,H,W] in [-1,1] -> normalised latents [B,C,h,w] (posterior mean unless sample=True)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B,3,H,W], got shape {tuple(pixels.shape)}")
        dist = vae.encode(self._to_vae(pixels.to(vae.device, vae.dtype))).latent_dist
        raw = dist.sample(generator) if sample else dist.mode()
        return self._normalize(vae, self._from_vae(raw))

    @torch.no_grad()
    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,C,h,w] -> pixels [B,3,H,W] clamped to [-1,1]."""
        raw = self._denormalize(vae, latents.to(vae.device, vae.dtype))
        return self._from_vae(vae.decode(self._to_vae(raw), return_dict=False)[0]).clamp(-1, 1)

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x  # 4-D VAEs take [B,C,H,W] as is; Qwen adds a frame axis

    def _from_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def _channel_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE config's per-channel `latents_mean` / `latents_std` as [1,C,1,1] tensors like `like` (None if
        absent)."""
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is None or std is None:
            return None
        return tuple(torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1) for v in (mean, std))

    def _normalize(self, vae, raw: torch.Tensor) -> torch.Tensor:
        shift = vae.config.get("shift_factor") or 0.0
        return (raw - shift) * vae.config.scaling_factor

    def _denormalize(self, vae, latents: torch.Tensor) -> torch.Tensor:
        shift = vae.config.get("shift_factor") or 0.0
        return latents / vae.config.scaling_factor + shift

    # ------------------------------------------------------------------ transformer call
    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B,C,h,w] -> the transformer's layout (2x2 patches [B, h*w/4, 4C] when `packed`)."""
        if not self.packed:
            return x
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"{self.family} packs 2x2 latent patches: latent height/width must be even, got {h}x{w}")
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of `pack` for latent height h and width w."""
        if not self.packed:
            return tokens
        b, n, c4 = tokens.shape
        x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c4 // 4, h, w)

    def forward(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                *, tt: torch.Tensor | float | None = None, sign: torch.Tensor | float | None = None,
                guidance: float | None = None) -> torch.Tensor:
        """Predict the flow velocity v = noise - data for latents x [B,C,h,w] at sigma [B] in [0,1].

        tt/sign (per-sample [B] or floats) feed the any-step embeddings for this call only (see `anystep`), with the
        fp32 sigma as their t: the transformer sees sigma in x's dtype, and bf16 sigma would make (t - tt) non-zero at
        tt = sigma.
        guidance: distilled-guidance value for transformers with guidance_embeds (default `default_guidance`);
        ignored by families without one.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be latents [B,C,h,w], got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.shape != (b,):
            raise ValueError(f"sigma must have shape [B]=({b},), got {tuple(sigma.shape)}")
        missing = [k for k in self.cond_keys if k not in cond and not k.endswith("_mask")]  # no mask: all valid
        if missing:
            raise KeyError(f"cond lacks {missing} for family {self.family!r}; expected keys {list(self.cond_keys)}")
        module = unwrap(transformer)
        state = (anystep.anystep_state(module, tt, sign, t=sigma.float()) if tt is not None or sign is not None
                 else contextlib.nullcontext())
        masked = any(k.endswith("_mask") for k in cond)  # collate_cond leaves out masks without a zero
        with state, attention.masked_attention(masked):
            sig = self.pipeline_timestep(sigma, x.dtype)
            out = self._call_transformer(transformer, module, self.pack(x), sig, cond, h, w, guidance)
        return self.unpack(out, h, w)

    def pipeline_timestep(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sigma in [0, 1] as the stock pipeline hands it to the denoiser (see `timestep_in_model_dtype`); exact
        for a diffusion base (the diff2flow bridge needs it)."""
        if self.diffusion_base or not self.timestep_in_model_dtype:
            return sigma.float()
        return (sigma.float() * 1000).to(dtype) / 1000

    def _call_transformer(self, transformer, module, hidden, sigma, cond, h, w, guidance) -> torch.Tensor:
        raise NotImplementedError

    def _guidance(self, module, batch: int, guidance: float | None, device) -> torch.Tensor | None:
        """The per-sample guidance tensor diffusers' Flux-style pipelines pass (None without guidance_embeds)."""
        if not module.config.get("guidance_embeds", False):
            return None
        g = self.default_guidance if guidance is None else float(guidance)
        return torch.full((batch,), g, device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ batches of cached conditioning
    collate_cond = staticmethod(cond_batches.collate_cond)  # per-sample dicts -> a batch, text padded
    split_cond = staticmethod(cond_batches.split_cond)  # the inverse: per-sample dicts, text trimmed

    def micro_cond(self, plans: list) -> dict[str, torch.Tensor]:
        """Conditioning a batch takes from its images rather than their captions, built from each sample's
        `fewstep.data.buckets.Plan` and merged into `cond` (SDXL: add_time_ids); none for most families."""
        return {}

    # ------------------------------------------------------------------ stock pipelines and LoRA export
    def build_pipeline(self, comps: ModelComponents, *, denoiser: nn.Module | None = None, scheduler=None):
        """The stock diffusers pipeline over these components (text encoders may be None); `denoiser` replaces the
        loaded one (e.g. a trained transformer or UNet)."""
        if comps.vae is None:
            raise ValueError("build_pipeline needs the VAE (its scale factor sets latent sizes): load with_vae=True")
        den = unwrap(denoiser if denoiser is not None else comps.denoiser)
        pipe = self.pipeline_cls(**{self.denoiser_subfolder: den}, vae=comps.vae,
                                 scheduler=scheduler if scheduler is not None else comps.scheduler,
                                 **self._text_kwargs(comps))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_prompt_kwargs(self, cond: dict[str, torch.Tensor], negative_cond: dict | None = None, *,
                               guidance: float | None = None) -> dict[str, Any]:
        """Pipeline call kwargs from cached conditioning, so `pipe(**kwargs, sigmas=...)` runs without encoders.

        Without negative_cond, classifier-free guidance is switched off. `guidance` has `forward`'s meaning
        (distilled guidance embedding), so pipeline sampling and `forward` agree by default.
        """
        kwargs = {k: cond[k] for k in self.cond_keys}
        if negative_cond is not None:
            kwargs.update({"negative_" + k: negative_cond[k] for k in self.cond_keys})
        kwargs.update(self._pipeline_guidance_kwargs(negative_cond is not None, guidance))
        return kwargs

    def _pipeline_guidance_kwargs(self, has_negative: bool, guidance: float | None) -> dict[str, Any]:
        return {}

    def pipeline_cfg_kwargs(self, scale: float) -> dict[str, Any]:
        """The pipeline kwarg for classifier-free guidance at `scale` (with negative embeddings in the call)."""
        return {self.cfg_scale_kwarg: float(scale)}

    @property
    def default_negative_prompt(self) -> str:
        """What classifier-free guidance steers away from when no negative prompt is given, in validation and in
        launcher/sample.py alike: " " for the flow families (the Glance reference's for Qwen-Image), and for a
        diffusion base (SDXL) the empty prompt, whose zeros are training's unconditional input."""
        return "" if self.diffusion_base else " "

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance as the family's pipeline combines the two velocities (validation sampling)."""
        return v_uncond + scale * (v_cond - v_uncond)

    def start_noise(self, comps: ModelComponents, batch: int, height: int, width: int,
                    generator: torch.Generator) -> torch.Tensor:
        """A pipeline's start latents [B,C,h,w] for an image of about height x width, drawn in fp32 on the CPU from
        `generator` as the stock pipelines draw them (same shape, same stream), whatever dtype the pipeline runs
        in. Pass them with `pipeline_latent_kwargs`: a pipeline draws its own in its dtype, and torch before 2.13
        draws CPU bf16 normals from another, coarser stream (uniforms of 8 bits), so a bf16 image would start from
        other noise than the fp32 image of the same seed."""
        f = self.vae_scale_factor(comps.vae)
        m = f * (2 if self.packed else 1)  # what the pipeline rounds the size down to
        channels = comps.denoiser.config.in_channels // (4 if self.packed else 1)
        shape = (batch, channels, height // m * (m // f), width // m * (m // f))
        return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)

    def pipeline_latent_kwargs(self, comps: ModelComponents, x: torch.Tensor) -> dict[str, Any]:
        """`latents`, `height`, `width` kwargs that make a pipeline start from latents x [B,C,h,w]."""
        f = self.vae_scale_factor(comps.vae)
        return {"latents": self.pack(x), "height": x.shape[2] * f, "width": x.shape[3] * f}

    def latents_from_pipeline(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """A pipeline's output_type="latent" result -> latents [B,C,h,w]."""
        return self.unpack(latents, h, w)

    def save_lora(self, directory: str | os.PathLike, lora_layers: dict[str, torch.Tensor]) -> None:
        """Export the denoiser's LoRA weights with the pipeline class's `save_lora_weights` (so `load_lora_weights`
        loads them)."""
        self.pipeline_cls.save_lora_weights(str(directory), **{self.lora_layers_kwarg: lora_layers},
                                            safe_serialization=True)

    # ------------------------------------------------------------------ any-step (TwinFlow) inputs
    def add_anystep(self, transformer: nn.Module) -> nn.Module:
        """Attach zero-initialised target-time and sign embeddings to `transformer` (see `fewstep.models.anystep`)."""
        return anystep.add_anystep_embeddings(unwrap(transformer), self.hook_time_scale, self.anystep_module)
