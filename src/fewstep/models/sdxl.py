"""SDXL (and SDXL-layout models): a diffusion base (epsilon or v prediction) used as a flow model through diff2flow.

The denoiser is a `UNet2DConditionModel` in the folder's `unet/`; text is CLIP-L + OpenCLIP-bigG (penultimate hidden
states concatenated, bigG's projected pooled embedding), plus SDXL's six micro-conditioning `add_time_ids`. `forward`
returns the flow velocity like every family: the bridge (`fewstep.methods.diff2flow`) scales the flow state into the
diffusion state, picks the UNet timestep from the folder's `alphas_cumprod`, and converts its epsilon / v output, with
the documented rule for sigma above the base's range (sigma = 1 is pure noise). The prediction type and the
`alphas_cumprod` table come from the folder's scheduler config when the adapter resolves the folder
(`adapter.resolve`, which `load` and the trainer call); `set_prediction_type` overrides the first, for good (a later
`resolve` or `load` of the folder keeps the override).
"""
from __future__ import annotations

import json
import os

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from fewstep.errors import ConfigError
from fewstep.methods import diff2flow
from fewstep.models.base import FlowModelAdapter
from fewstep.models.registry import register_adapter
from fewstep.models.source import forces_zeros_for_empty_prompt
from fewstep.schedulers.diffusion_base import alphas_cumprod_from_config

SDXL_VAE_FACTOR = 8  # every SDXL VAE downsamples 8x; a resolved folder's own VAE config takes precedence


@register_adapter
class SDXLAdapter(FlowModelAdapter):
    family = "sdxl"
    aliases = ("sdxl1", "stablediffusionxl")
    diffusion_base = True
    pipeline_cls = StableDiffusionXLPipeline
    denoiser_cls = UNet2DConditionModel
    denoiser_subfolder = "unet"
    scheduler_cls = EulerDiscreteScheduler
    lora_layers_kwarg = "unet_lora_layers"
    anystep_module = "time_embedding"  # TimestepEmbedding: its input is the sinusoid, so t comes from the state
    hook_time_scale = None
    vae_cls = AutoencoderKL
    text_encoder_specs = (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # every attention of the UNet's transformer blocks
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_text_len = 77  # CLIP's context (both encoders); SDXL has no long text encoder
    packed = False

    def __init__(self):
        self.prediction_override = None  # set_prediction_type's choice: wins over every folder resolved
        # SDXL base 1.0's schedule until a folder is resolved: scaled-linear betas 0.00085..0.012, epsilon
        self._set_schedule({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
        self._default_time_ids = {}  # (H, W, device, dtype) -> the pipeline's default add_time_ids [1, 6] there
        self.pixel_factor = SDXL_VAE_FACTOR
        self.force_zeros_for_empty_prompt = True  # the pipeline's default; a folder's model_index.json may say false

    # ------------------------------------------------------------------ the base's schedule
    def _set_schedule(self, scheduler_config) -> None:
        # the same table the TwinFlowScheduler builds from this config when it samples the UNet
        self.alphas_cumprod = alphas_cumprod_from_config(scheduler_config).double()
        self._sigma_tables = {}  # device -> diff2flow.sigma_table(alphas_cumprod) there
        self.folder_prediction_type = scheduler_config.get("prediction_type", "epsilon")
        self.prediction_type = self.prediction_override or self.folder_prediction_type

    def use_prediction_type(self, prediction_type: str, source: str) -> str | None:
        """The config's prediction type wins over the folder's (some v fine-tunes ship an epsilon scheduler config);
        a disagreement is returned as a warning naming both."""
        folder = self.folder_prediction_type
        self.set_prediction_type(prediction_type)
        if prediction_type == "epsilon" and float(self.alphas_cumprod[-1]) < 1e-4:
            # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): at zero terminal SNR the top steps divide by ~0
            raise ConfigError(f"prediction_type 'epsilon' with {source}'s zero-terminal-SNR schedule (last "
                              f"alphas_cumprod {float(self.alphas_cumprod[-1]):.1e}): x0 from epsilon divides by "
                              "sqrt(alphas_cumprod) there; such bases predict v: set prediction_type 'v_prediction'")
        if prediction_type == folder:
            return None
        return (f"prediction_type '{prediction_type}' (config) differs from '{folder}' in {source}'s scheduler config; "
                f"using '{prediction_type}'")

    def set_prediction_type(self, prediction_type: str) -> None:
        """Use `prediction_type` ('epsilon' / 'v_prediction') whatever the folder's scheduler config says."""
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{self.family} predicts 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.prediction_type = self.prediction_override = prediction_type

    def resolve(self, name_or_path: str) -> str:
        """As the base class, then read the folder's scheduler config (schedule, prediction type) and VAE factor."""
        src = super().resolve(name_or_path)
        self._set_schedule(self.scheduler_cls.load_config(src, subfolder="scheduler"))
        self.force_zeros_for_empty_prompt = forces_zeros_for_empty_prompt(src)
        vae_cfg = os.path.join(src, "vae", "config.json")
        if os.path.isfile(vae_cfg):
            with open(vae_cfg) as fh:
                self.pixel_factor = 2 ** (len(json.load(fh)["block_out_channels"]) - 1)
        return src

    def sigma_range(self) -> tuple[float, float]:
        """The flow sigmas [lo, hi] the base schedule covers (beyond: `fewstep.methods.diff2flow`'s rule)."""
        return diff2flow.sigma_range(self.alphas_cumprod)

    # ------------------------------------------------------------------ text
    def _encode_prompt_batch(self, pipe, prompts, max_sequence_length=None):
        # CLIP's length is its tokenizer's (77 for SDXL): max_sequence_length is for T5-style encoders
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False)
        if self.force_zeros_for_empty_prompt:  # SDXL's unconditional input is zeros, not the CLIP of "" (the folder's
            # model_index.json says otherwise for some fine-tunes; the pipeline built here has the constructor's True)
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    # Latents as StableDiffusionXLPipeline scales them: by scaling_factor, with the VAE's per-channel latents_mean/std
    # when its config has them (some SDXL-layout VAEs); shift_factor is not used by SDXL pipelines.
    def _normalize(self, vae, raw):
        stats = self._channel_stats(vae, raw)
        scale = vae.config.scaling_factor
        return raw * scale if stats is None else (raw - stats[0]) * scale / stats[1]

    def _denormalize(self, vae, latents):
        stats = self._channel_stats(vae, latents)
        scale = vae.config.scaling_factor
        return latents / scale if stats is None else latents * stats[1] / scale + stats[0]

    def patch_factor(self, unet):
        """The UNet halves the latent at every down block but the last: sides must divide by 2 ** (levels - 1)
        (4 for SDXL's three levels, the value used when the UNet is not at hand)."""
        return 2 ** (len(unet.config.block_out_channels) - 1) if unet is not None else 4

    # ------------------------------------------------------------------ the bridged UNet call
    def time_ids(self, batch: int, h: int, w: int, device, dtype) -> torch.Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size) for an uncropped h x w latent, as
        `StableDiffusionXLPipeline` builds it by default."""
        H, W = h * self.pixel_factor, w * self.pixel_factor
        key = (H, W, torch.device(device), dtype)
        if key not in self._default_time_ids:  # once per size and device: a host copy in every call would wait
            self._default_time_ids[key] = torch.tensor([[H, W, 0, 0, H, W]], dtype=dtype).to(device)
        return self._default_time_ids[key].expand(batch, 6)

    def micro_cond(self, plans: list) -> dict[str, torch.Tensor]:
        """Each training image's add_time_ids, as SDXL was trained with them (and diffusers' SDXL fine-tuning builds
        them): its original size (h, w) before resizing, the crop's top-left corner (y, x) in the resized image, the
        target size (h, w). A randomly cropped image thus does not teach the model that crops are whole images;
        sampling keeps the pipeline's (H, W, 0, 0, H, W)."""
        rows = []
        for p in plans:
            if p.source is None:
                raise ValueError(f"micro_cond: plan {p.tag()} has no source size (plans from Geometry.plan have one)")
            rows.append([p.source[1], p.source[0], p.offset[1], p.offset[0], p.target[1], p.target[0]])
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    def _call_transformer(self, unet, module, hidden, sigma, cond, h, w, guidance):
        # sigma is fp32 here (diffusion_base): the bridge's scale, timestep and conversion need it exact
        x_diff = diff2flow.flow_to_diffusion_input(hidden, sigma)
        table = self._sigma_tables.get(sigma.device)
        if table is None:  # made once per device: a copy from the CPU in every call would wait for the GPU's queue
            table = self._sigma_tables[sigma.device] = diff2flow.sigma_table(self.alphas_cumprod).to(sigma.device)
        timestep = diff2flow.bridge_timestep(sigma, self.alphas_cumprod, table).float()
        time_ids = cond.get("time_ids")  # the training images' own (micro_cond); else the pipeline's default
        if time_ids is None:
            time_ids = self.time_ids(hidden.shape[0], h, w, hidden.device, hidden.dtype)
        elif time_ids.shape != (hidden.shape[0], 6):
            raise ValueError(f"cond['time_ids'] must be [B, 6] = ({hidden.shape[0]}, 6), got {tuple(time_ids.shape)}")
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids.to(hidden.dtype)}
        out = unet(x_diff, timestep, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                   return_dict=False)[0]
        return diff2flow.bridge_velocity(out, hidden, sigma, self.alphas_cumprod, self.prediction_type)
