"""The diff2flow benchmark's model: a small SDXL-layout UNet over the pixel VAE, and its plain DDPM teacher loop.

Everything is a real diffusers `StableDiffusionXLPipeline` folder written with `save_pretrained`. Text encoders and
tokenizers are fewstep's tiny SDXL ones (random, frozen; CLIP hidden 32 + 32 = cross-attention 64, pooled 32), the UNet
is random-initialised and trained here from scratch with the DDPM loss (epsilon or v), on SDXL's scheduler settings.

Latent standardisation. The stock SDXL pipeline decodes `latents / scaling_factor` and ignores `shift_factor`, while
fewstep's adapter (`FlowModelAdapter._normalize`) subtracts it: they would disagree. So the VAE here has
shift_factor None and the training-pixel mean is folded INTO the pixel VAE (the encoder's output bias subtracts it,
the decoder's output bias adds it back); scaling_factor = 1 / std. Encode -> (grey - mean) / std, decode exact, and
both code paths see the same zero-mean unit-variance latents.
"""
from __future__ import annotations

import math
import time

import torch

import pixel_pipeline

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)  # SDXL's
UNET = dict(block_out_channels=(32, 64), layers_per_block=2)  # 1.48 M parameters ((64, 128) would be 5.8 M)
UNET_SMOKE = dict(block_out_channels=(32, 64), layers_per_block=1)


@torch.no_grad()
def sdxl_pixel_vae(mean: float, std: float, resolution: int):
    """The pixel VAE (2x2 average / nearest x2) with the pixel mean inside its biases, shift_factor None."""
    vae = pixel_pipeline.pixel_vae(None, 1.0 / std, resolution)
    vae.encoder.conv_out.bias[0] -= mean  # latent mean channel: grey - mean
    vae.decoder.conv_out.bias[:3] += mean  # RGB out: latent + mean
    return vae


def unet(block_out_channels=(64, 128), layers_per_block=2, seed: int = 0):
    """A small SDXL-layout UNet2DConditionModel on 1-channel 8x8 latents (text_time micro-conditioning)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=tuple(block_out_channels),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=layers_per_block, cross_attention_dim=64, use_linear_projection=True,
            norm_num_groups=min(32, block_out_channels[0] // 2), attention_head_dim=(4, 8),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32)  # 6 time ids x 8 + the pooled 32


def scheduler(prediction_type: str):
    """SDXL base 1.0's scheduler config (EulerDiscrete, scaled-linear DDPM betas) with the given prediction type."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**BETAS, prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1)


def save_pipeline(path: str, prediction_type: str, mean: float, std: float, resolution: int, seed: int = 0,
                  **unet_kw) -> str:
    """Write the SDXL pipeline folder (tiny text encoders, pixel VAE, fresh UNet, scheduler); returns the path."""
    from diffusers import StableDiffusionXLPipeline

    from fewstep.models.tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline("sdxl")
    pipe = StableDiffusionXLPipeline(vae=sdxl_pixel_vae(mean, std, resolution), text_encoder=tiny.text_encoder,
                                     text_encoder_2=tiny.text_encoder_2, tokenizer=tiny.tokenizer,
                                     tokenizer_2=tiny.tokenizer_2, unet=unet(seed=seed, **unet_kw),
                                     scheduler=scheduler(prediction_type), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def train_teacher(base_dir: str, out_dir: str, latents: torch.Tensor, labels: torch.Tensor, cond: dict, *,
                  steps: int, batch: int = 64, lr: float = 1e-3, warmup: int = 100, dropout: float = 0.1,
                  seed: int = 0, log=print) -> dict:
    """Plain DDPM training of the folder's UNet (loss on its prediction_type), saved as a full pipeline in out_dir.

    latents [N,1,8,8] (standardised), labels [N], cond: per-class `prompt_embeds` [10,L,64] and
    `pooled_prompt_embeds` [10,32]; dropped captions get zeros (SDXL's empty prompt)."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, add_watermarker=False)
    kind = pipe.scheduler.config.prediction_type
    abar = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.float()
    net = pipe.unet.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    side = latents.shape[-1] * 2  # pixels: the VAE's factor 2
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).expand(batch, 6)
    t0, losses = time.time(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x, y = latents[idx], labels[idx]
        keep = (torch.rand(batch, generator=g) >= dropout).float()
        enc = cond["prompt_embeds"][y] * keep[:, None, None]
        pooled = cond["pooled_prompt_embeds"][y] * keep[:, None]
        k = torch.randint(0, len(abar), (batch,), generator=g)
        eps = torch.randn(x.shape, generator=g)
        a, b = abar[k].sqrt().view(-1, 1, 1, 1), (1 - abar[k]).sqrt().view(-1, 1, 1, 1)
        target = eps if kind == "epsilon" else a * eps - b * x
        pred = net(a * x + b * eps, k, encoder_hidden_states=enc,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            log(f"teacher ({kind}) step {step}/{steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({(time.time() - t0) / step:.3f} s/step)")
    net.eval()
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return {"steps": steps, "final_loss": sum(losses[-100:]) / len(losses[-100:]), "wall_s": time.time() - t0,
            "params": sum(p.numel() for p in net.parameters()), "finite": math.isfinite(losses[-1])}
