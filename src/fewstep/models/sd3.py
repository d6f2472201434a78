"""Stable Diffusion 3 / 3.5: two CLIPs + T5 text, NCHW latents (the transformer patchifies), timestep in [0,1000]."""
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from fewstep.models.base import FlowModelAdapter
from fewstep.models.registry import register_adapter


@register_adapter
class SD3Adapter(FlowModelAdapter):
    family = "sd3"
    aliases = ("sd35", "stablediffusion3")
    pipeline_cls = StableDiffusion3Pipeline
    denoiser_cls = SD3Transformer2DModel
    vae_cls = AutoencoderKL
    text_encoder_specs = (("text_encoder", CLIPTextModelWithProjection),
                          ("text_encoder_2", CLIPTextModelWithProjection),
                          ("text_encoder_3", T5EncoderModel))
    tokenizer_subfolders = ("tokenizer", "tokenizer_2", "tokenizer_3")
    # joint attention: image-stream and text-stream ("add_*") projections
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    hook_time_scale = 1000.0  # SD3 passes the 0-1000 timestep straight to time_text_embed
    timestep_in_model_dtype = False  # its pipeline passes the scheduler's fp32 timesteps
    default_text_len = 256
    packed = False

    def patch_factor(self, transformer):
        return transformer.config.patch_size if transformer is not None else 2

    def _encode_prompt_batch(self, pipe, prompts, **kwargs):
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                         do_classifier_free_guidance=False, **kwargs)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def _call_transformer(self, transformer, module, hidden, sigma, cond, h, w, guidance):
        return transformer(hidden_states=hidden, timestep=sigma * 1000, encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

    def _pipeline_guidance_kwargs(self, has_negative, guidance):
        # SD3's guidance_scale is classifier-free guidance, which needs negative embeddings: off without them
        return {} if has_negative else {"guidance_scale": 1.0}
