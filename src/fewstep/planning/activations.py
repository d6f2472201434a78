"""Activation memory, measured on the meta device rather than guessed from a formula.

Tokens: (resolution / 16)^2 image tokens (VAE /8, then 2x2 patches) + text tokens (the pipeline's default length:
512 for Qwen-Image and FLUX, 77 CLIP + 256 T5 for SD3, 77 CLIP for SDXL). A UNet (SDXL) takes the R/8 x R/8 latent
as it is; (R/16)^2 is then the token count of its widest attention level. Blocks are the units diffusers' gradient
checkpointing recomputes one at a time: a transformer's top-level block lists (transformer_blocks, ...); in a UNet
every `resnets` list (ResnetBlock2D) and every Transformer2DModel's `transformer_blocks` list (BasicTransformerBlock).
Block lists run forward on meta tensors of those shapes under `saved_tensors_hooks` (lists of identical,
shape-preserving blocks cut to two; a UNet's resnets lists, whose blocks change width and take skip connections, run
whole); what autograd keeps for backward is summed per block (parameters excluded, attention counted as flash /
memory-efficient attention keeps it: q, k, v, out and the fp32 log-sum-exp). Then

    no checkpointing:  saved = outside blocks + sum over blocks of (block saved)
    checkpointing:     saved = outside blocks + sum over blocks of (block inputs) + shared inputs (temb, RoPE)
    peak = saved + W - (block saved)   no checkpointing (the running block's unsaved intermediates)
         = saved + W                   checkpointing (one block recomputed in backward) or a no-grad teacher pass

with W a block's working set: its saved activations were every weight trainable (so W = block saved under full
fine-tuning; under LoRA it adds the frozen layers' outputs). Backward frees saved tensors about as fast as it makes
gradients. Checked against the RSS of real forward/backward passes on CPU (tests/test_plan.py).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from fewstep.planning.model import build_meta_transformer, cast


def _flux_inputs(c, b, h, txt, dt):
    return dict(hidden_states=torch.randn(b, h * h, c.in_channels, dtype=dt),
                encoder_hidden_states=torch.randn(b, txt, c.joint_attention_dim, dtype=dt),
                pooled_projections=torch.randn(b, c.pooled_projection_dim, dtype=dt), timestep=torch.rand(b, dtype=dt),
                img_ids=torch.zeros(h * h, 3, dtype=dt), txt_ids=torch.zeros(txt, 3, dtype=dt),
                guidance=torch.ones(b, dtype=dt) if c.guidance_embeds else None)


def _sd3_inputs(c, b, h, txt, dt):  # NCHW latents: 2h x 2h at VAE /8, patchified 2x2 inside
    return dict(hidden_states=torch.randn(b, c.in_channels, 2 * h, 2 * h, dtype=dt),
                encoder_hidden_states=torch.randn(b, txt, c.joint_attention_dim, dtype=dt),
                pooled_projections=torch.randn(b, c.pooled_projection_dim, dtype=dt), timestep=torch.rand(b, dtype=dt))


def _qwen_inputs(c, b, h, txt, dt):
    return dict(hidden_states=torch.randn(b, h * h, c.in_channels, dtype=dt),
                encoder_hidden_states=torch.randn(b, txt, c.joint_attention_dim, dtype=dt),
                encoder_hidden_states_mask=torch.ones(b, txt, dtype=torch.long), timestep=torch.rand(b, dtype=dt),
                img_shapes=[[(1, h, h)]] * b)


def _unet_inputs(c, b, h, txt, dt):  # SDXL-style UNet: NCHW latents 2h x 2h (VAE /8), no patches
    added = None
    if c.addition_embed_type == "text_time":  # pooled text + 6 micro-conditioning time ids, each embedded to 256
        n_ids = 6
        added = {"text_embeds": torch.randn(b, c.projection_class_embeddings_input_dim
                                            - n_ids * c.addition_time_embed_dim, dtype=dt),
                 "time_ids": torch.zeros(b, n_ids, dtype=dt)}
    return dict(sample=torch.randn(b, c.in_channels, 2 * h, 2 * h, dtype=dt), timestep=torch.rand(b, dtype=dt),
                encoder_hidden_states=torch.randn(b, txt, c.cross_attention_dim, dtype=dt), added_cond_kwargs=added)


# denoiser class -> (forward kwargs from (config, batch, h = resolution/16, text tokens, dtype),
#                    text tokens beyond the adapter's `default_text_len`: SD3 prepends 77 CLIP tokens)
MODEL_INPUTS = {"FluxTransformer2DModel": (_flux_inputs, 0), "SD3Transformer2DModel": (_sd3_inputs, 77),
                "QwenImageTransformer2DModel": (_qwen_inputs, 0), "UNet2DConditionModel": (_unet_inputs, 0)}
# denoiser class -> its text length whatever the adapter's `default_text_len` (a T5-style max_sequence_length):
# CLIP-only pipelines (SDXL) always encode the tokenizer's 77 tokens
FIXED_TEXT_TOKENS = {"UNet2DConditionModel": 77}


def default_text_tokens(class_name: str, default_text_len: int) -> int:
    """Text tokens the family's pipeline encodes by default for a denoiser of `class_name`."""
    if class_name in FIXED_TEXT_TOKENS:
        return FIXED_TEXT_TOKENS[class_name]
    return default_text_len + MODEL_INPUTS.get(class_name, (None, 0))[1]


class _FlashSDPA(torch.autograd.Function):
    """What flash / memory-efficient attention keeps for backward: q, k, v, out and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run on meta
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashSDPA.apply(query, key, value)


@dataclass
class Activations:
    """Bytes at the planned batch. `lists`: (blocks in the model, saved per block, inputs per block) per block list."""

    outside: int  # saved by the embedders / final layer, plus tensors shared by several blocks (RoPE, temb)
    shared_inputs: int  # inputs every block receives (temb, RoPE tables): stored once under checkpointing
    lists: list = field(default_factory=list)
    working: int = 0  # W: one block's saved activations were every weight trainable

    @property
    def block(self) -> int:
        return max(s for _, s, _ in self.lists)

    def saved(self, checkpointing: bool) -> int:
        per = [n * (i if checkpointing else s) for n, s, i in self.lists]
        return self.outside + (self.shared_inputs if checkpointing else 0) + sum(per)

    def peak(self, checkpointing: bool, teacher: bool = False) -> int:
        """Saved activations + the largest transient (module docstring)."""
        working = max(self.working, self.block)
        return self.saved(checkpointing) + (working if checkpointing or teacher else working - self.block)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def block_lists(model: nn.Module) -> list[tuple[str, bool]]:
    """(qualified name, cuttable) of each block list (module docstring): a transformer's top-level ModuleLists; in a
    UNet (a model with `down_blocks` and `up_blocks`) every `resnets` list (not cuttable: widths change, skip
    connections are consumed) and every `transformer_blocks` list (cuttable)."""
    if isinstance(getattr(model, "down_blocks", None), nn.ModuleList) and hasattr(model, "up_blocks"):
        return [(name, name.endswith("transformer_blocks")) for name, ml in model.named_modules()
                if isinstance(ml, nn.ModuleList) and len(ml) > 0 and name.rsplit(".", 1)[-1] in
                ("resnets", "transformer_blocks")]
    return [(name, True) for name, ml in model.named_children() if isinstance(ml, nn.ModuleList) and len(ml) > 0]


def trace_activations(model: nn.Module, inputs: dict, keep_blocks: int = 2) -> Activations:
    """Run `model(**inputs)` (cuttable block lists cut to `keep_blocks`) and sum what autograd saves, per block.

    Works on any device; on meta it costs nothing. Tensors are told apart by their storage, so views count once.
    """
    lists = [(name, len(model.get_submodule(name)), cut) for name, cut in block_lists(model)]
    for name, _, cut in lists:
        if cut:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.ModuleList(list(model.get_submodule(name))[:keep_blocks]))
    lists = [(name, n) for name, n, _ in lists]
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved, block_inputs, where, hooks = {}, {}, [None], []

    def pack(t):  # keeps a reference, so a storage id cannot be reused within the trace
        sid = t.untyped_storage()._cdata
        if sid not in params:
            saved.setdefault(sid, [t, t.untyped_storage().nbytes(), set()])[2].add(where[0])
        return t

    for name, _ in lists:
        for i, blk in enumerate(model.get_submodule(name)):
            def pre(mod, args, kwargs, label=(name, i)):
                where[0] = label
                block_inputs[label] = {t.untyped_storage()._cdata: (t, t.untyped_storage().nbytes())
                                       for t in _tensors(list(args) + list(kwargs.values()))}

            hooks += [blk.register_forward_pre_hook(pre, with_kwargs=True),
                      blk.register_forward_hook(lambda *_: where.__setitem__(0, None))]
    sdpa, nn.functional.scaled_dot_product_attention = nn.functional.scaled_dot_product_attention, _flash_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs, return_dict=False)
    finally:
        nn.functional.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    outside = sum(nb for _, nb, labels in saved.values() if len(labels) > 1 or None in labels)
    count = {}
    for ins in block_inputs.values():
        for sid in ins:
            count[sid] = count.get(sid, 0) + 1
    shared = {sid: nb for ins in block_inputs.values() for sid, (_, nb) in ins.items() if count[sid] > 1}
    rows = []
    for name, n in lists:
        labels = [(name, i) for i in range(len(model.get_submodule(name)))]
        s = [sum(nb for _, nb, lab in saved.values() if lab == {label}) for label in labels]
        i = [sum(nb for sid, (_, nb) in block_inputs[label].items() if sid not in shared) for label in labels]
        rows.append((n, sum(s) // len(s), sum(i) // len(i)))
    return Activations(outside, sum(shared.values()), rows)


def model_activations(model_config: dict, *, batch: int, resolution: int, text_tokens: int, dtype: torch.dtype,
                      lora_targets=None, lora_rank: int = 0, anystep=None) -> Activations:
    """Activations of the training model: LoRA on a frozen base if `lora_targets`, plus `anystep(model)` (TwinFlow's
    any-step embeddings) if given; full fine-tuning otherwise."""
    cls = model_config["_class_name"]
    if cls not in MODEL_INPUTS:
        raise ValueError(f"no activation inputs for {cls}; known: {', '.join(MODEL_INPUTS)}")
    model = build_meta_transformer(model_config, dtype)
    if anystep is not None:
        with torch.device("meta"):
            anystep(model)
        cast(model, dtype)
    if lora_targets:
        from peft import LoraConfig

        model.requires_grad_(False)
        with torch.device("meta"):
            model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(lora_targets)))
        cast(model, dtype)
        if anystep is not None:
            model.anystep_embed.requires_grad_(True)
    with torch.device("meta"):
        inputs = MODEL_INPUTS[cls][0](model.config, batch, resolution // 16, text_tokens, dtype)
    acts = trace_activations(model, inputs)
    acts.working = acts.block
    if lora_targets:  # frozen layers save nothing, but their outputs exist while the block runs
        acts.working = trace_activations(model.requires_grad_(True), inputs).block
    return acts


@functools.lru_cache(maxsize=16)
def cached_activations(model_config_json: str, batch: int, resolution: int, text_tokens: int, dtype: torch.dtype,
                       lora_targets: tuple = (), lora_rank: int = 0, anystep=None) -> Activations:
    """`model_activations` memoised on hashable arguments (the model config as sorted JSON)."""
    return model_activations(json.loads(model_config_json), batch=batch, resolution=resolution,
                             text_tokens=text_tokens, dtype=dtype, lora_targets=lora_targets, lora_rank=lora_rank,
                             anystep=anystep)
