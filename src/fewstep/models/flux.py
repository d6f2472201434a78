"""FLUX.1 (dev/schnell/Krea ...): CLIP-L pooled + T5 text, 2x2-packed latents, timestep in [0,1], distilled guidance."""
import functools

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from fewstep.models.base import FlowModelAdapter
from fewstep.models.registry import register_adapter


@register_adapter
class FluxAdapter(FlowModelAdapter):
    family = "flux"
    aliases = ("flux1",)
    pipeline_cls = FluxPipeline
    denoiser_cls = FluxTransformer2DModel
    vae_cls = AutoencoderKL
    text_encoder_specs = (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel))
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    hook_time_scale = 1000.0  # FluxTransformer2DModel multiplies the [0,1] timestep by 1000 before time_text_embed
    cfg_scale_kwarg = "true_cfg_scale"  # guidance_scale is the distilled-guidance embedding's value
    distilled_guidance = True
    packed = True

    def _encode_prompt_batch(self, pipe, prompts, **kwargs):
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, **kwargs)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def _call_transformer(self, transformer, module, hidden, sigma, cond, h, w, guidance):
        b = hidden.shape[0]
        txt = cond["prompt_embeds"]
        img_ids, txt_ids = position_ids(h // 2, w // 2, txt.shape[1], hidden.device, hidden.dtype)
        return transformer(hidden_states=hidden, timestep=sigma, guidance=self._guidance(module, b, guidance,
                           hidden.device), pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=txt,
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def _pipeline_guidance_kwargs(self, has_negative, guidance):
        # FluxPipeline's guidance_scale feeds the distilled guidance embedding (forward's `guidance`)
        return {"guidance_scale": self.default_guidance if guidance is None else float(guidance)}


@functools.lru_cache(maxsize=32)
def position_ids(h: int, w: int, text_len: int, device: torch.device, dtype: torch.dtype):
    """(img_ids [h*w, 3] = (0, row, column), txt_ids [text_len, 3] = 0), as FluxPipeline builds them, made once per
    shape on the device: the pipeline's helper builds them on the CPU and copies them over in every call, a copy
    from pageable memory that waits for the GPU's queue (a TwinFlow step makes about ten calls)."""
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, device=device, dtype=torch.float32)[None, :].expand(h, w)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).to(dtype)
    return img_ids, torch.zeros(text_len, 3, device=device, dtype=dtype)
