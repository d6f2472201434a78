"""The benchmark's model: a small FLUX.1-architecture transformer over an identity-like ("pixel") VAE.

Everything is a real diffusers `FluxPipeline` folder written with `save_pretrained`, so training and sampling go through
the same `from_pretrained` loaders as a real FLUX.1 checkpoint. Text encoders and tokenizers are fewstep's tiny ones
(random, frozen; captions map to distinct word tokens), the transformer is random-initialised and trained from scratch.

The pixel VAE. An `AutoencoderKL` (one latent channel) whose weights are set so that it is exact on grey images:
  * every resnet's second conv is zero, so each resnet block returns its input; the mid-block has no attention;
  * conv_in writes 8 channels [r, g, b, -r, -g, -b, K, -K] (K = 1000, from the bias). One GroupNorm group spans all 8,
    so its mean is exactly 0 and its variance (K^2 + sum E[c^2]) / 4 is K^2/4 to 1e-6: with weight K/2 the norm
    passes the signal through unchanged (relative error ~|x|^2 / K^2);
  * the GroupNorm bias adds 20 before the SiLU, where SiLU(x) = x to 4e-8 relative (|x| <= ~4), and conv_out
    removes it again;
  * the encoder's latent mean is the grey value (r + g + b) / 3, its log-variance -30; the decoder writes it to RGB;
  * with 2 levels (the default, spatial factor 2) the encoder's downsampler is a 2x2 average and the decoder's
    upsampler nearest-neighbour x2 followed by a pass-through conv: lossless on 2x nearest-upsampled images.
The VAE's `shift_factor` / `scaling_factor` standardise the training pixels (mean 0, std 1), as a real VAE's do, so the
flow model sees zero-mean unit-variance latents. Latents are therefore the (standardised) 8x8 digits themselves.
"""
from __future__ import annotations

import os

import torch

K_CONST = 1000.0  # the constant +-K channels that pin the GroupNorm statistics
SILU_OFFSET = 20.0  # SiLU(x + 20) - 20 = x - (x+20)*sigmoid(-(x+20)) ~ x for |x| < 5


def _zero_(module) -> None:
    for p in module.parameters():
        torch.nn.init.zeros_(p)


@torch.no_grad()
def pixel_vae(shift_factor: float = 0.0, scaling_factor: float = 1.0, sample_size: int = 16, levels: int = 2):
    """An AutoencoderKL whose encode/decode is (near) identity between grey RGB pixels and a 1-channel latent.

    levels=1: spatial factor 1. levels=2: factor 2, encode = 2x2 average, decode = nearest upsampling (lossless on
    images that were nearest-upsampled 2x, as the benchmark's digits are).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                        layers_per_block=1, latent_channels=1, norm_num_groups=1, sample_size=sample_size,
                        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=False, force_upcast=False)
    eye = torch.eye(8)
    for part in (vae.encoder, vae.decoder):
        for name, m in part.named_modules():
            if not isinstance(m, torch.nn.Conv2d):
                continue
            if name.endswith("conv2"):  # resnet blocks -> identity
                _zero_(m)
            elif "downsamplers" in name:  # zero-pad right/bottom, 3x3 stride 2: taps [0:2, 0:2] = 2x2 average
                _zero_(m)
                m.weight[:, :, :2, :2] = 0.25 * eye[:, :, None, None]
            elif "upsamplers" in name:  # after nearest x2: a 3x3 conv that passes through (centre tap)
                _zero_(m)
                m.weight[:, :, 1, 1] = eye
        _zero_(part.conv_in)
        _zero_(part.conv_out)
        part.conv_norm_out.weight.fill_(K_CONST / 2.0)  # std of the group is K/2: undo the normalisation
        part.conv_norm_out.bias.fill_(SILU_OFFSET)
        part.conv_in.bias[6], part.conv_in.bias[7] = K_CONST, -K_CONST
    enc, dec = vae.encoder, vae.decoder
    for c in range(3):  # centre tap of the 3x3 kernels
        enc.conv_in.weight[c, c, 1, 1], enc.conv_in.weight[3 + c, c, 1, 1] = 1.0, -1.0
        dec.conv_in.weight[c, 0, 1, 1], dec.conv_in.weight[3 + c, 0, 1, 1] = 1.0, -1.0
        enc.conv_out.weight[0, c, 1, 1] = 1.0 / 3.0  # latent mean = grey value
        dec.conv_out.weight[c, c, 1, 1] = 1.0
        dec.conv_out.bias[c] = -SILU_OFFSET
    enc.conv_out.bias[0] = -SILU_OFFSET
    enc.conv_out.bias[1] = -30.0  # log-variance: a (near) deterministic posterior
    return vae


def flux_transformer(width: int = 128, heads: int = 4, double_layers: int = 2, single_layers: int = 2,
                     text_dim: int = 32, pooled_dim: int = 32):
    """A FLUX.1-architecture transformer for 1-channel latents (2x2 packing: 4 input channels), no guidance embed."""
    from diffusers import FluxTransformer2DModel

    head_dim = width // heads
    if head_dim % 4:
        raise ValueError(f"width/heads = {head_dim} must be a multiple of 4 (rotary axes)")
    a0 = head_dim // 4 // 2 * 2  # rotary axes (index, row, column): even sizes summing to head_dim
    a1 = (head_dim - a0) // 4 * 2
    axes = [a0, a1, head_dim - a0 - a1]
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=double_layers,
                                  num_single_layers=single_layers, attention_head_dim=head_dim,
                                  num_attention_heads=heads, joint_attention_dim=text_dim,
                                  pooled_projection_dim=pooled_dim, guidance_embeds=False, axes_dims_rope=axes)


def build_pipeline(shift_factor: float, scaling_factor: float, resolution: int, *, width: int = 128, heads: int = 4,
                   double_layers: int = 2, single_layers: int = 2, text_len: int = 8, seed: int = 0):
    """The benchmark FluxPipeline: fewstep's tiny text encoders, the pixel VAE and a fresh transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fewstep.models.tiny import build_tiny_pipeline, word_tokenizer

    tiny = build_tiny_pipeline("flux")  # seeded text encoders and tokenizers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = flux_transformer(width, heads, double_layers, single_layers,
                                       text_dim=tiny.text_encoder_2.config.d_model,
                                       pooled_dim=tiny.text_encoder.config.hidden_size)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=pixel_vae(shift_factor, scaling_factor,
                                                                                    resolution),
                        text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                        text_encoder_2=tiny.text_encoder_2, tokenizer_2=word_tokenizer("t5", text_len),
                        transformer=transformer)


def save_pipeline(path: str, **kwargs) -> str:
    """`build_pipeline(**kwargs)` written with `save_pretrained` (fp32 safetensors); returns the path."""
    build_pipeline(**kwargs).save_pretrained(path, safe_serialization=True)
    return path


def with_transformer(base_dir: str, transformer_dir: str, out_dir: str) -> str:
    """A pipeline folder equal to `base_dir` but whose transformer/ is `transformer_dir` (symlinks, no copies)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(base_dir):
        src = os.path.abspath(transformer_dir if name == "transformer" else os.path.join(base_dir, name))
        dst = os.path.join(out_dir, name)
        if os.path.islink(dst):
            os.remove(dst)
        os.symlink(src, dst)
    return out_dir
