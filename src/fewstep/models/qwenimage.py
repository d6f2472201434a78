"""Qwen-Image: Qwen2.5-VL text (variable length + mask), 5-D Wan-style VAE, 2x2-packed latents, timestep in [0,1]."""
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLForConditionalGeneration

from fewstep.models.base import FlowModelAdapter
from fewstep.models.registry import register_adapter


@register_adapter
class QwenImageAdapter(FlowModelAdapter):
    family = "qwenimage"
    config_name = "qwen_image"
    aliases = ("qwen",)
    pipeline_cls = QwenImagePipeline
    denoiser_cls = QwenImageTransformer2DModel
    vae_cls = AutoencoderKLQwenImage
    text_encoder_specs = (("text_encoder", Qwen2_5_VLForConditionalGeneration),)
    tokenizer_subfolders = ("tokenizer",)
    # Glance / TwinFlow LoRA recipe for Qwen-Image
    default_lora_targets = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                            "to_add_out", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")
    cond_keys = ("prompt_embeds", "prompt_embeds_mask")
    hook_time_scale = 1.0  # QwenTimestepProjEmbeddings gets the [0,1] timestep (its time_proj scales by 1000)
    default_text_len = 512  # QwenImagePipeline.__call__ default (encode_prompt alone allows 1024)
    packed = True
    cfg_scale_kwarg = "true_cfg_scale"
    sample_cfg_scale = 5.0  # Glance's reference samples Qwen-Image with true CFG 5, negative prompt " "

    def guide(self, v_cond, v_uncond, scale):
        """QwenImagePipeline's true CFG: the guided velocity rescaled to the conditional one's norm per token (a
        token: one 2x2 patch of the latents, all its channels), which keeps guidance from inflating the velocity."""
        guided = super().guide(v_cond, v_uncond, scale)
        return guided * (_token_norms(v_cond) / _token_norms(guided))

    def vae_scale_factor(self, vae):
        return 2 ** len(vae.temperal_downsample)

    def _encode_prompt_batch(self, pipe, prompts, **kwargs):
        prompt_embeds, mask = pipe.encode_prompt(prompt=prompts, **kwargs)
        if mask is None:  # the pipeline drops an all-ones mask; the cache keeps it (collate_cond drops it again)
            mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        return {"prompt_embeds": prompt_embeds, "prompt_embeds_mask": mask}

    # The VAE is a video VAE: [B,C,H,W] <-> [B,C,1,H,W], latents normalised per channel by latents_mean/std.
    def _to_vae(self, x):
        return x.unsqueeze(2)

    def _from_vae(self, x):
        return x[:, :, 0]

    def _normalize(self, vae, raw):
        mean, std = self._channel_stats(vae, raw)
        return (raw - mean) / std

    def _denormalize(self, vae, latents):
        mean, std = self._channel_stats(vae, latents)
        return latents * std + mean

    def _call_transformer(self, transformer, module, hidden, sigma, cond, h, w, guidance):
        img_shapes = [[(1, h // 2, w // 2)]] * hidden.shape[0]
        return transformer(hidden_states=hidden, timestep=sigma, encoder_hidden_states=cond["prompt_embeds"],
                           encoder_hidden_states_mask=cond.get("prompt_embeds_mask"), img_shapes=img_shapes,
                           return_dict=False)[0]


def _token_norms(v: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> the L2 norm of each packed token (a 2x2 patch over all C channels), spread back over its
    patch: [B, 1, H, W]."""
    squares = F.avg_pool2d(v.float().pow(2).sum(1, keepdim=True), 2) * 4
    return squares.sqrt().repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1).to(v.dtype)
