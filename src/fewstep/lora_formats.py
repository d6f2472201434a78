"""LoRA files in the ComfyUI/kohya key layout, written beside fewstep's diffusers file.

fewstep's own file, `pytorch_lora_weights.safetensors`, is diffusers/peft layout over diffusers module names
(`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`). `lora_export_formats: [diffusers, comfyui]` adds
`pytorch_lora_weights_comfyui.safetensors` in the kohya (sd-scripts) layout over the module names of the model's
*original* checkpoint, the names ComfyUI's own model classes use:

    lora_unet_<module with "." -> "_">.lora_down.weight   [rank, in]
    lora_unet_<module with "." -> "_">.lora_up.weight     [out, rank]
    lora_unet_<module with "." -> "_">.alpha              scalar; LoRA scale = alpha / rank

ComfyUI maps `lora_unet_` + every weight name of its model, for every model (`model_lora_keys_unet` in
comfy/lora.py), so this is the layout every ComfyUI version with the model accepts; kohya-derived tools read it too.

- FLUX.1: the BFL names (comfy/utils.py `flux_to_diffusers` gives the same correspondence). Fused targets are one
  LoRA: `double_blocks.N.img_attn.qkv` = to_q|to_k|to_v, `txt_attn.qkv` = add_q_proj|add_k_proj|add_v_proj,
  `single_blocks.N.linear1` = to_q|to_k|to_v|proj_mlp. Separate member LoRAs A_i [r, in], B_i [out_i, r] become one
  of rank n*r: lora_down = [A_1; ...; A_n] stacked, lora_up = block-diagonal(B_1, ..., B_n), which is exactly
  sum_i (B_i A_i) placed in the member's rows. A member without a LoRA gets zero blocks. diffusers'
  `_convert_kohya_flux_lora_to_diffusers` detects this block-diagonal ("sparse") form and splits it back into the
  same A_i, B_i (members that had none come back as all-zero LoRAs). `final_layer.adaLN_modulation.1` stores
  (shift, scale) where diffusers' `norm_out.linear` stores (scale, shift): its lora_up rows are swapped halves.
- Qwen-Image: ComfyUI's QwenImage model uses the diffusers module names, so the kohya name is the diffusers name;
  diffusers reads it back with `_convert_non_diffusers_qwen_lora_to_diffusers`.
- SDXL: the sgm/LDM UNet names of the original checkpoint (kohya's sd-scripts trains SDXL on that UNet; ComfyUI
  and A1111 map them): `down_blocks.i.attentions.j` -> `input_blocks.(1 + i(L+1) + j).1`, `mid_block.attentions.0`
  -> `middle_block.1`, `up_blocks.i.attentions.j` -> `output_blocks.(i(L+1) + j).1` with L = the UNet's
  `layers_per_block` (2 for SDXL); inside an attention (proj_in, proj_out, transformer_blocks.k.attn1/attn2,
  ff.net) the names are the same. diffusers reads it back with `_maybe_map_sgm_blocks_to_diffusers`. LoRAs on the
  UNet's resnets (convolutions) are refused: the default and kohya's own SDXL targets are the attention Linears.
- SD3 has no diffusers converter for this layout to check a file against (and ComfyUI loads fewstep's diffusers
  SD3 file as it is), so it is refused at config time.

The exporter folds each module's LoRA scale into lora_B before writing either file (see `fold_scaling`), so every
alpha here equals its rank: diffusers' converters then return bit-identical tensors (they multiply by alpha / rank
= 1), and no loader's alpha convention matters.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fewstep.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are made: config validation uses this module too
    import torch

COMFYUI_WEIGHTS_NAME = "pytorch_lora_weights_comfyui.safetensors"  # must not end in pytorch_lora_weights.safetensors
FORMATS = ("diffusers", "comfyui")
FAMILIES = ("flux", "qwenimage", "sdxl")
PREFIX = "lora_unet_"
_PIPELINE_PREFIX = r"(?:transformer\.|unet\.)?"  # the denoiser's prefix in a diffusers pipeline's LoRA file

# FLUX.1: diffusers module suffix -> BFL module suffix, per block kind; fused BFL modules list their members in
# row order. Sources: diffusers' `_convert_kohya_flux_lora_to_diffusers` (the inverse of this) and ComfyUI's
# `flux_to_diffusers` (comfy/utils.py).
_FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "norm1.linear": "img_mod.lin", "attn.to_add_out": "txt_attn.proj",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "norm1_context.linear": "txt_mod.lin"}
_FLUX_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"}
_FLUX_SWAPPED = {"final_layer.adaLN_modulation.1"}  # lora_up rows: diffusers (scale, shift) -> BFL (shift, scale)

# Qwen-Image: the modules diffusers' Qwen converter maps back from `lora_unet_` names (its protected n-grams and its
# top-level table), i.e. every Linear of QwenImageTransformer2DModel.
_QWEN_BLOCK = re.compile(r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|"
                         r"(img|txt)_mod\.1|(img|txt)_mlp\.net\.(0\.proj|2))")
_QWEN_TOP = {"img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2"}

# SDXL: an attention (Transformer2DModel) of the diffusers UNet, then the Linear inside it (same name in sgm)
_SDXL_ATTENTION = re.compile(r"(?:down_blocks\.(\d+)\.attentions\.(\d+)|(mid_block)\.attentions\.0|"
                             r"up_blocks\.(\d+)\.attentions\.(\d+))\."
                             r"(proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_[qkv]|to_out\.0)|"
                             r"ff\.net\.(?:0\.proj|2)))")


class LoraFormatError(UserError):
    """A LoRA module that has no place in the requested file layout."""


def normalize_formats(formats) -> list[str]:
    """The `lora_export_formats` option as a clean list: stripped, lower-case, duplicates dropped."""
    out = []
    for f in formats or []:
        f = str(f).strip().lower()
        if f and f not in out:
            out.append(f)
    return out


def formats_problem(formats: list[str], model_type: str, model_family: str | None) -> str | None:
    """Why these `lora_export_formats` cannot be honoured for this run (None if they can)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        return f"'lora_export_formats' must list formats from {', '.join(FORMATS)}; got {', '.join(unknown)}"
    if "diffusers" not in formats:
        return (f"'lora_export_formats' must include 'diffusers' (fewstep's sampler and load_lora_weights(dir) read "
                f"it); got {', '.join(formats) or 'none'}: use "
                + ("'diffusers,comfyui' to write the ComfyUI/kohya file beside it" if "comfyui" in formats else
                   "'diffusers', with 'comfyui' to write the ComfyUI/kohya file beside it"))
    if "comfyui" in formats:
        if model_type != "lora":
            return ("'lora_export_formats' comfyui applies to LoRA runs; a full fine-tune (model_type full) exports "
                    "a diffusers transformer/ folder")
        family = re.sub(r"[-_ .]", "", str(model_family).lower())
        if family not in FAMILIES:
            return (f"'lora_export_formats' comfyui is available for flux, qwen_image and sdxl, not {model_family}: "
                    "fewstep writes (and tests) the kohya layout only where diffusers has a converter to check it "
                    "against (ComfyUI loads fewstep's diffusers SD3 file, its `transformer.` keys, as it is)")
    return None


def kohya_target(family: str, module: str, layers_per_block: int | None = None) -> tuple[str, tuple[str, ...]]:
    """(original-checkpoint module, its diffusers members in row order) for a diffusers module name.

    A plain module is its own single member; a fused one lists every member (including ones without a LoRA).
    layers_per_block: the UNet config's, for sdxl (the sgm block index counts a block's layers).
    Raises LoraFormatError for a module the layout cannot hold."""
    if family == "flux":
        for pattern, plain, fused, bfl in ((r"transformer_blocks\.(\d+)\.", _FLUX_DOUBLE, _FLUX_DOUBLE_FUSED,
                                            "double_blocks"),
                                           (r"single_transformer_blocks\.(\d+)\.", _FLUX_SINGLE, _FLUX_SINGLE_FUSED,
                                            "single_blocks")):
            m = re.match(pattern, module)
            if not m:
                continue
            block, rest = m.group(0), module[m.end():]
            if rest in plain:
                return f"{bfl}.{m.group(1)}.{plain[rest]}", (module,)
            for name, members in fused.items():
                if rest in members:
                    return f"{bfl}.{m.group(1)}.{name}", tuple(block + s for s in members)
            break
        if module in _FLUX_TOP:
            return _FLUX_TOP[module], (module,)
    elif family == "qwenimage":
        if _QWEN_BLOCK.fullmatch(module) or module in _QWEN_TOP:
            return module, (module,)
    elif family == "sdxl":
        m = _SDXL_ATTENTION.fullmatch(module)
        if m:
            return _sgm_attention(m, layers_per_block) + "." + m.group(6), (module,)
    else:
        raise LoraFormatError(f"the ComfyUI/kohya LoRA layout is available for {', '.join(FAMILIES)}, not {family}")
    raise LoraFormatError(f"LoRA module '{module}' has no ComfyUI/kohya key for {family}: drop it from lora_targets "
                          "or export only the diffusers format")


def _sgm_attention(m: re.Match, layers_per_block: int | None) -> str:
    """The sgm name of the UNet attention `m` matched (see the module docstring for the index arithmetic)."""
    if m.group(3):
        return "middle_block.1"
    if not isinstance(layers_per_block, int) or isinstance(layers_per_block, bool) or layers_per_block < 1:
        raise LoraFormatError(f"the sgm (kohya) SDXL names need the UNet's layers_per_block as one integer, got "
                              f"{layers_per_block!r}")
    per = layers_per_block + 1  # an sgm down block: its layers then a downsampler; an up block: L + 1 layers
    if m.group(1) is not None:
        return f"input_blocks.{1 + int(m.group(1)) * per + int(m.group(2))}.1"
    return f"output_blocks.{int(m.group(4)) * per + int(m.group(5))}.1"


def check_modules(family: str, modules, layers_per_block: int | None = None) -> None:
    """Raise LoraFormatError (one line naming every offender) unless every module maps to the kohya layout."""
    bad = []
    for module in modules:
        try:
            kohya_target(family, module, layers_per_block)
        except LoraFormatError:
            bad.append(module)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise LoraFormatError(f"lora_export_formats 'comfyui': LoRA modules with no ComfyUI/kohya key for {family}: "
                              f"{shown}; drop them from lora_targets or export only 'diffusers'")


def lora_pairs(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (lora_A [r, in], lora_B [out, r])} from a peft/diffusers state dict (an optional `transformer.` or
    `unet.` prefix is dropped)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.fullmatch(_PIPELINE_PREFIX + r"(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise LoraFormatError(f"unexpected key '{key}' in a LoRA state dict (expected <module>.lora_A/B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    missing = [mod for mod, p in pairs.items() if set(p) != {"A", "B"}]
    if missing:
        raise LoraFormatError(f"LoRA modules without both lora_A and lora_B: {', '.join(sorted(missing))}")
    return {mod: (p["A"], p["B"]) for mod, p in pairs.items()}


def fold_scaling(sd: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """lora_B * scale per module (scale = lora_alpha / r, as peft applies it), so the file means the same under
    every loader: without metadata, diffusers loads lora_alpha = r (scale 1), and ComfyUI reads no peft config.
    Exact for power-of-two scales (the usual alpha = r or 4r); otherwise one fp32 rounding per element."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(_PIPELINE_PREFIX + r"(.+)\.lora_B\.weight", key)
        scale = scales.get(m.group(1), 1.0) if m else 1.0
        out[key] = value * scale if scale != 1.0 else value
    return out


def to_kohya(family: str, sd: dict[str, torch.Tensor], out_features: dict[str, int] | None = None,
             layers_per_block: int | None = None) -> dict[str, torch.Tensor]:
    """The ComfyUI/kohya state dict of a LoRA at scale 1 (see `fold_scaling`), as fp32.

    out_features: output width of each diffusers Linear; needed only for members of a fused module that have no
    LoRA of their own (e.g. Flux's proj_mlp inside single-block linear1 when only to_q/to_k/to_v are trained).
    layers_per_block: the UNet config's (sdxl only)."""
    import torch

    pairs = lora_pairs(sd)
    groups: dict[str, tuple[str, ...]] = {}
    for module in pairs:
        target, members = kohya_target(family, module, layers_per_block)
        groups[target] = members
    out = {}
    for target, members in sorted(groups.items()):
        present = [pairs[m] for m in members if m in pairs]
        rank = max(a.shape[0] for a, _ in present)
        width = present[0][0].shape[1]
        downs, ups = [], []
        for member in members:
            a, b = pairs.get(member, (None, None))
            if a is None:
                if out_features is None or member not in out_features:
                    raise LoraFormatError(f"cannot write fused module '{target}': no LoRA and no output width "
                                          f"for its member '{member}'")
                a, b = torch.zeros(rank, width), torch.zeros(out_features[member], rank)
            if a.shape[1] != width:
                raise LoraFormatError(f"members of fused module '{target}' have different input widths")
            pad = rank - a.shape[0]  # a lower-rank member: zero rows in A, zero columns in B
            downs.append(torch.cat([a.float(), a.new_zeros(pad, width).float()]))
            ups.append(torch.cat([b.float(), b.new_zeros(b.shape[0], pad).float()], dim=1))
        down, up = torch.cat(downs), torch.block_diag(*ups)
        if target in _FLUX_SWAPPED:
            up = torch.cat(list(up.chunk(2, dim=0))[::-1])
        name = PREFIX + target.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1
    return out


def save_kohya(family: str, sd: dict[str, torch.Tensor], path: str,
               out_features: dict[str, int] | None = None, layers_per_block: int | None = None) -> None:
    """Write `to_kohya(...)` to `path` (safetensors)."""
    from safetensors.torch import save_file

    save_file(to_kohya(family, sd, out_features, layers_per_block), path,
              metadata={"format": "pt", "fewstep_layout": "kohya", "fewstep_model_family": family})
