"""Memory planner: the per-GPU memory of every ZeRO layout for a fewstep config, before a GPU is touched.

The transformer is built on the meta device from its diffusers config (`configs/models/*.json`, or a local diffusers
folder's `transformer/config.json`), so parameter counts are exact and nothing is allocated. Per GPU, with
N = GPUs in the run, P = all parameters, Pt = trainable ones, w = 2 bytes (bf16) or 4 (fp32), DeepSpeed 0.19.8:

    params   w*P (stages 0-2) | w*P/N + gathered window w*min(P, max_live + prefetch) + persistent (stage 3)
    grads    w*Pt (stages 0, 1: full until reduced) | w*Pt/N (2, 3)  + reduce buckets (2x with overlap_comm)
    optim    fp32 master 4*Pt (bf16 only at stage 0; a clone even in fp32 at stages >= 1) + Adam m, v 8*Pt, /N at >= 1
    ema      fewstep's EMA shadows the fp32 master partition: 4*Pt (/N at stages >= 1); LoRA: the adapter's partition
    step     transients of the optimizer step: fp32 copy of the grad partition (bf16; always at stage 3) + one
             partition-sized temporary of torch AdamW (foreach); none for DeepSpeed's fused Adam
    acts     activations, below; TwinFlow teacher passes are no-grad and overlap the student's saved activations

    total = params + optim + ema + max(grads + acts, step) + runtime overhead (CUDA context, NCCL; --overhead_gb)
            (at stage 3 the gathered window counts with grads + acts, not with the step)

Optimizer offload moves master, m, v, EMA and the fp32 grads to the host: 16*Pt/N (+4*Pt/N EMA) per rank; parameter
offload (stage 3) moves the w*P/N partition. Host figures are per node (GPUs per node x per rank).

Activations: tokens = (resolution/16)^2 image (VAE /8, 2x2 patches) + text tokens (pipeline default length). The
saved activations of one block are measured, not guessed: two blocks of each block list run forward on the meta device
under `saved_tensors_hooks` (parameters excluded, attention counted as flash attention saves it: q, k, v, out, lse).

    no checkpointing:  saved = outside-blocks + sum over blocks(block saved)
    checkpointing:     saved = outside-blocks + sum over blocks(block inputs)  + 1 block recomputed in backward
    peak = saved + 1 block (recomputed in backward under checkpointing; alive inside a no-grad teacher pass)

Measured convention differences to DeepSpeed's own estimators are documented in tests/test_plan.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

GiB = 2 ** 30
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
# shipped architecture per model family (used when the pretrained path is a hub id or not a local folder)
FAMILY_MODEL_CONFIGS = {"qwenimage": "qwen_image.json", "flux": "flux_dev.json", "sd3": "sd35_large.json"}
FALLBACK_LORA_TARGETS = {  # used only if fewstep.models is unavailable; the adapters hold the authoritative list
    "flux": ("to_q", "to_k", "to_v", "to_out.0"),
    "qwenimage": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                  "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"),
    "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}


# ---------------------------------------------------------------------------------------------------------------
# The model on the meta device
# ---------------------------------------------------------------------------------------------------------------
def load_model_config(path: str | os.PathLike) -> dict:
    """Read a diffusers transformer config JSON; it must name its class in `_class_name`."""
    with open(path) as fh:
        cfg = json.load(fh)
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise ValueError(f"{path}: expected a diffusers transformer config with '_class_name', e.g. "
                         f"{MODEL_CONFIG_DIR / 'flux_dev.json'}")
    return cfg


def resolve_model_config(family: str, name_or_path: str | None, model_config: str | None = None) -> dict:
    """The transformer config to plan for: an explicit JSON, a local diffusers folder, or the family's shipped one."""
    if model_config:
        return load_model_config(model_config)
    if name_or_path and os.path.isdir(name_or_path):
        for sub in ("transformer/config.json", "config.json"):
            if os.path.isfile(os.path.join(name_or_path, sub)):
                return load_model_config(os.path.join(name_or_path, sub))
        raise ValueError(f"pretrained_model_name_or_path {name_or_path!r} is a folder without transformer/config.json")
    key = _family_key(family)
    if key not in FAMILY_MODEL_CONFIGS:
        raise ValueError(f"model_family {family!r}: no shipped architecture (known: flux, sd3, qwen_image); "
                         "pass --model_config configs/models/<x>.json")
    return load_model_config(MODEL_CONFIG_DIR / FAMILY_MODEL_CONFIGS[key])


def _family_key(family: str) -> str:
    key = "".join(c for c in str(family).lower() if c.isalnum())
    return {"qwen": "qwenimage", "sd35": "sd3", "flux1": "flux"}.get(key, key)


def build_meta_transformer(model_config: dict, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The diffusers transformer named by `_class_name`, built on the meta device (no memory, exact shapes)."""
    import diffusers

    cls = getattr(diffusers, model_config["_class_name"], None)
    if cls is None:
        raise ValueError(f"_class_name {model_config['_class_name']!r} is not a diffusers class")
    kwargs = {k: v for k, v in model_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(kwargs)
    return _cast(model, dtype)


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype) without diffusers' warning about float32 modules (nothing is loaded here)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return model.to(dtype)
    finally:
        logging.set_verbosity(level)


def lora_targets_for(family: str, configured=None) -> tuple[str, ...]:
    """Configured targets, else the family adapter's `default_lora_targets`."""
    if configured:
        return tuple(configured)
    try:
        from fewstep.models import get_adapter
        return tuple(get_adapter(family).default_lora_targets)
    except ImportError:  # pragma: no cover - the models package ships with fewstep
        return FALLBACK_LORA_TARGETS[_family_key(family)]


def lora_param_count(model: nn.Module, targets, rank: int) -> int:
    """LoRA parameters peft adds: rank*(in + out) per targeted Linear (peft's rule: name == t or endswith '.t')."""
    total, hit = 0, set()
    for name, mod in model.named_modules():
        match = [t for t in targets if name == t or name.endswith("." + t)]
        if not match:
            continue
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"LoRA target {match[0]!r} matches {name} ({type(mod).__name__}), not a Linear")
        total += rank * (mod.in_features + mod.out_features)
        hit.update(match)
    missing = set(targets) - hit
    if missing:
        raise ValueError(f"LoRA targets {sorted(missing)} match no module of {type(model).__name__}")
    return total


@dataclass
class ParamCounts:
    total: int  # every parameter the engine holds (base + LoRA + any-step embeddings)
    trainable: int
    buffer_bytes: int  # non-parameter buffers (SD3's positional table), replicated
    persistent: int  # stage 3: parameters at or below the persistence threshold, kept whole on every rank
    largest_module: int  # DeepSpeed's "largest layer": the most parameters one module holds directly

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_params(model: nn.Module, *, lora: bool, targets=(), rank: int = 0, extra_trainable: int = 0,
                 persistence_threshold: int = 0) -> ParamCounts:
    """Exact counts for full fine-tuning or LoRA (analytic, no peft needed) on a meta model.

    extra_trainable: parameters already in `model` that train under LoRA too (TwinFlow's any-step embeddings)."""
    base = sum(p.numel() for p in model.parameters())
    n_lora = lora_param_count(model, targets, rank) if lora else 0
    trainable = (n_lora if lora else base) + extra_trainable
    persistent = sum(p.numel() for p in model.parameters() if p.numel() <= persistence_threshold)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ParamCounts(base + n_lora, trainable, buffers, persistent, largest)


# ---------------------------------------------------------------------------------------------------------------
# Activations, measured on the meta device
# ---------------------------------------------------------------------------------------------------------------
def _flux_inputs(c, b, h, txt, dt):
    return dict(hidden_states=torch.randn(b, h * h, c.in_channels, dtype=dt),
                encoder_hidden_states=torch.randn(b, txt, c.joint_attention_dim, dtype=dt),
                pooled_projections=torch.randn(b, c.pooled_projection_dim, dtype=dt), timestep=torch.rand(b, dtype=dt),
                img_ids=torch.zeros(h * h, 3, dtype=dt), txt_ids=torch.zeros(txt, 3, dtype=dt),
                guidance=torch.ones(b, dtype=dt) if c.guidance_embeds else None)


def _sd3_inputs(c, b, h, txt, dt):
    return dict(hidden_states=torch.randn(b, c.in_channels, 2 * h, 2 * h, dtype=dt),
                encoder_hidden_states=torch.randn(b, txt, c.joint_attention_dim, dtype=dt),
                pooled_projections=torch.randn(b, c.pooled_projection_dim, dtype=dt), timestep=torch.rand(b, dtype=dt))


def _qwen_inputs(c, b, h, txt, dt):
    return dict(hidden_states=torch.randn(b, h * h, c.in_channels, dtype=dt),
                encoder_hidden_states=torch.randn(b, txt, c.joint_attention_dim, dtype=dt),
                encoder_hidden_states_mask=torch.ones(b, txt, dtype=torch.long), timestep=torch.rand(b, dtype=dt),
                img_shapes=[[(1, h, h)]] * b)


# transformer class -> (forward kwargs builder, extra text tokens beyond the adapter's long encoder: SD3 adds 77 CLIP)
MODEL_INPUTS = {"FluxTransformer2DModel": (_flux_inputs, 0), "SD3Transformer2DModel": (_sd3_inputs, 77),
                "QwenImageTransformer2DModel": (_qwen_inputs, 0)}


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
    shared_inputs: int  # block inputs every block receives (temb, RoPE tables): stored once under checkpointing
    lists: list = field(default_factory=list)

    @property
    def block(self) -> int:
        return max(s for _, s, _ in self.lists)

    def saved(self, checkpointing: bool) -> int:
        per = [n * (i if checkpointing else s) for n, s, i in self.lists]
        return self.outside + (self.shared_inputs if checkpointing else 0) + sum(per)

    def peak(self, checkpointing: bool, teacher: bool = False) -> int:
        """Saved + the largest transient: one block's activations, recomputed in backward under checkpointing or
        alive inside a no-grad teacher pass. Backward frees saved tensors about as fast as it makes gradients."""
        return self.saved(checkpointing) + (self.block if checkpointing or teacher else 0)


def trace_activations(model: nn.Module, inputs: dict, keep_blocks: int = 2) -> Activations:
    """Run `model` forward on meta and sum what autograd saves, per block (each block list cut to `keep_blocks`)."""
    lists = [(name, len(ml)) for name, ml in model.named_children() if isinstance(ml, nn.ModuleList) and len(ml) > 1]
    for name, _ in lists:
        setattr(model, name, nn.ModuleList(list(getattr(model, name))[:keep_blocks]))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved, block_inputs, where, hooks = {}, {}, [None], []

    def pack(t):
        sid = t.untyped_storage()._cdata  # identifies the storage (views share it) on meta too
        if sid not in params:
            saved.setdefault(sid, [t, t.untyped_storage().nbytes(), set()])[2].add(where[0])
        return t

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (tuple, list)):
            return [t for o in obj for t in tensors(o)]
        return []

    for name, _ in lists:
        for i, blk in enumerate(getattr(model, name)):
            def pre(mod, args, kwargs, label=(name, i)):
                where[0] = label
                block_inputs[label] = {t.untyped_storage()._cdata: (t, t.untyped_storage().nbytes())
                                       for t in tensors(list(args) + list(kwargs.values()))}

            hooks += [blk.register_forward_pre_hook(pre, with_kwargs=True),
                      blk.register_forward_hook(lambda *a: where.__setitem__(0, None))]
    sdpa, nn.functional.scaled_dot_product_attention = nn.functional.scaled_dot_product_attention, _flash_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs, return_dict=False)
    finally:
        nn.functional.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    outside = sum(nb for _, nb, labels in saved.values() if len(labels) > 1 or None in labels)
    seen = {}
    for label, ins in block_inputs.items():
        for sid in ins:
            seen[sid] = seen.get(sid, 0) + 1
    shared = {sid: nb for ins in block_inputs.values() for sid, (_, nb) in ins.items() if seen[sid] > 1}
    rows = []
    for name, n in lists:
        labels = [(name, i) for i in range(min(n, keep_blocks))]
        s = [sum(nb for _, nb, lab in saved.values() if lab == {label}) for label in labels]
        i = [sum(nb for sid, (_, nb) in block_inputs[label].items() if sid not in shared) for label in labels]
        rows.append((n, sum(s) // len(s), sum(i) // len(i)))
    return Activations(outside, sum(shared.values()), rows)


def model_activations(model_config: dict, *, batch: int, resolution: int, text_tokens: int, dtype: torch.dtype,
                      lora_targets=None, lora_rank: int = 0, anystep=None) -> Activations:
    """Activations of the configured training model (LoRA and any-step embeddings attached, frozen base)."""
    cls = model_config["_class_name"]
    if cls not in MODEL_INPUTS:
        raise ValueError(f"no activation inputs for {cls}; known: {', '.join(MODEL_INPUTS)}")
    model = build_meta_transformer(model_config, dtype)
    if anystep is not None:
        with torch.device("meta"):
            anystep(model)
        _cast(model, dtype)
    if lora_targets:
        from peft import LoraConfig
        model.requires_grad_(False)
        with torch.device("meta"):
            model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(lora_targets)))
        _cast(model, dtype)
        if anystep is not None:
            model.anystep_embed.requires_grad_(True)
    with torch.device("meta"):
        inputs = MODEL_INPUTS[cls][0](model.config, batch, resolution // 16, text_tokens, dtype)
    return trace_activations(model, inputs)


# ---------------------------------------------------------------------------------------------------------------
# ZeRO layouts
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ZeroKnobs:
    """The DeepSpeed settings memory depends on (defaults: fewstep's generated config on GPU)."""

    reduce_bucket_size: float = 5e8
    allreduce_bucket_size: float = 5e8  # stage 0's gradient all-reduce buckets
    overlap_comm: bool = True  # stages 1-2: double reduce buffers
    max_live_parameters: float = 1e9  # stage 3 gathered window
    prefetch_bucket_size: float = 5e7
    param_persistence_threshold: float = 1e5
    fused_adam: bool = False  # DeepSpeed's fused Adam (optimizer: deepspeed) updates in place
    device: str = "cuda"  # "cpu": gloo and torch AdamW's for-loop path (CI), see `adam_temporaries` and `layout_memory`

    @property
    def adam_temporaries(self) -> int:
        """fp32 partition-sized temporaries of one torch AdamW step: foreach (CUDA) keeps sqrt(v) in a new list; the
        CPU for-loop computes `v.sqrt() / c` (two alive at once). Fused Adam: none."""
        return 0 if self.fused_adam else (1 if self.device == "cuda" else 2)


@dataclass
class Layout:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    params: float  # bytes per GPU
    grads: float
    optim: float
    ema: float
    acts: float
    step: float
    overhead: float
    host_per_node: float
    window: float = 0.0  # ZeRO-3 gathered weights (part of params), freed before the optimizer step
    total: float = 0.0
    fits: bool = False
    host_fits: bool | None = None

    @property
    def name(self) -> str:
        off = "+".join(k for k, on in (("opt", self.offload_optimizer), ("param", self.offload_param)) if on)
        return f"ZeRO-{self.stage}" + (f" offload {off}" if off else "")


def layout_memory(c: ParamCounts, acts: float, *, stage: int, offload_optimizer: bool = False,
                  offload_param: bool = False, gpus_per_node: int = 1, nodes: int = 1, bf16: bool = True,
                  ema: bool = False, knobs: ZeroKnobs = ZeroKnobs(), overhead: float = 0.0) -> Layout:
    """Per-GPU bytes of one ZeRO layout (see the module docstring for each term)."""
    if offload_param and stage != 3 or offload_optimizer and stage == 0:
        raise ValueError(f"stage {stage} cannot offload {'parameters' if offload_param else 'the optimizer'}")
    n = gpus_per_node * nodes
    w, P, Pt = (2 if bf16 else 4), c.total, c.trainable
    shard = Pt if stage == 0 else Pt / n  # this rank's share of optimizer-owned tensors
    window = 0.0
    if stage < 3:
        params = w * P + c.buffer_bytes
    else:
        # gathered weights during forward/backward: the live window, at least the largest module (it runs whole);
        # released before the step. gloo stages each coalesced all-gather (<= prefetch bucket) through a copy.
        window = w * max(c.largest_module, min(P, knobs.max_live_parameters + knobs.prefetch_bucket_size))
        if knobs.device == "cpu":
            window += w * min(P, knobs.prefetch_bucket_size + c.largest_module)
        params = (0 if offload_param else w * P / n) + w * c.persistent + c.buffer_bytes + window
    if stage == 0:
        grads = w * Pt + (w * min(Pt, knobs.allreduce_bucket_size) if n > 1 else 0)
    elif stage == 1:  # full gradients until the reduce at the end of backward
        grads = w * Pt + w * knobs.reduce_bucket_size * (2 if knobs.overlap_comm else 1)
    elif stage == 2:
        grads = (0 if offload_optimizer else w * Pt / n) + w * knobs.reduce_bucket_size * (2 if knobs.overlap_comm
                                                                                           else 1)
    else:
        grads = (0 if offload_optimizer else w * Pt / n) + w * knobs.reduce_bucket_size
    master = 4 * Pt if (stage > 0 or bf16) else 0
    optim = 0 if offload_optimizer else (master + 8 * Pt) / (1 if stage == 0 else n)
    shadow = 4 * shard if ema else 0
    if offload_optimizer:  # the step runs on the host
        step = 0.0
    else:  # grads left after the reduce + fp32 copy of them (bf16; stage 3 always) + torch AdamW's temporary
        fp32_grads = 4 * shard if (bf16 or stage == 3) else 0
        step = w * shard + fp32_grads + knobs.adam_temporaries * 4 * shard
    if knobs.device == "cpu" and 0 < stage < 3:  # gloo's all-gather of the updated weights copies the flat buffer
        step = max(step, w * P)
    host = ((16 * Pt / n + (4 * Pt / n if ema else 0)) if offload_optimizer else 0) + (w * P / n if offload_param
                                                                                         else 0)
    lay = Layout(stage, offload_optimizer, offload_param, params, grads, optim, 0 if offload_optimizer else shadow,
                 acts, step, overhead, host * gpus_per_node, window)
    lay.total = params - window + optim + lay.ema + max(grads + acts + window, step) + overhead
    return lay


LAYOUTS = [(0, False, False), (1, False, False), (2, False, False), (3, False, False), (1, True, False),
           (2, True, False), (3, True, False), (3, False, True), (3, True, True)]  # least communication first


@dataclass
class Plan:
    model: str
    counts: ParamCounts
    activations: Activations
    settings: dict
    layouts: list
    recommended: Layout | None
    configured: Layout | None


def _get(cfg, key, default=None):
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    return default if value is None else value


def as_config(cfg):
    """A fewstep Config from a Config, a dict (SimpleTuner spelling accepted) or a JSON path."""
    from fewstep.config import Config, load_config

    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, os.PathLike)):
        return load_config(str(cfg))
    return load_config(None, {k.lstrip("-"): v for k, v in dict(cfg).items()})


def knobs_for(cfg, device: str = "cuda") -> ZeroKnobs:
    """ZeroKnobs from the DeepSpeed config fewstep generates for `cfg` on `device` (`deepspeed_config` overrides
    included); overlap_comm is on exactly on CUDA, as the engine sets it."""
    from fewstep.engine.deepspeed_engine import build_ds_config

    z = build_ds_config(dataclasses.replace(cfg, zero_stage=3, offload_optimizer=False, offload_param=False))
    z, d = z["zero_optimization"], ZeroKnobs()
    return ZeroKnobs(float(z.get("reduce_bucket_size", d.reduce_bucket_size)),
                     float(z.get("allreduce_bucket_size", d.allreduce_bucket_size)), device == "cuda",
                     float(z.get("stage3_max_live_parameters", d.max_live_parameters)),
                     float(z.get("stage3_prefetch_bucket_size", d.prefetch_bucket_size)),
                     float(z.get("stage3_param_persistence_threshold", d.param_persistence_threshold)),
                     cfg.optimizer == "deepspeed", device)


def plan_memory(cfg, gpus: int = 1, nodes: int = 1, gpu_mem_gb: float = 80.0, host_mem_gb: float | None = None, *,
                model_config: str | dict | None = None, text_tokens: int | None = None, overhead_gb: float = 2.0,
                margin: float = 0.05, knobs: ZeroKnobs | None = None) -> Plan:
    """Memory of every ZeRO layout (stages 0-3, optimizer/parameter offload) for `cfg` on `gpus` x `nodes` GPUs.

    cfg: a fewstep Config, a config dict or a JSON path. gpus: GPUs per node. gpu_mem_gb / host_mem_gb: GiB per GPU /
    per node. A layout fits when its total (overhead_gb included) is within (1 - margin) of gpu_mem_gb. The
    recommendation is the first fitting layout in `LAYOUTS` order: lowest stage without offload first.
    """
    cfg = as_config(cfg)
    if gpus < 1 or nodes < 1:
        raise ValueError(f"gpus and nodes must be >= 1, got gpus={gpus}, nodes={nodes}")
    res = int(_get(cfg, "resolution", 1024))
    if res % 16:
        raise ValueError(f"resolution must be a multiple of 16 (VAE /8, 2x2 patches), got {res}")
    mc = model_config if isinstance(model_config, dict) else resolve_model_config(
        cfg.model_family, cfg.pretrained_model_name_or_path, model_config)
    from fewstep.models import get_adapter
    adapter = get_adapter(cfg.model_family)
    knobs = knobs or knobs_for(cfg)
    bf16, lora = cfg.mixed_precision == "bf16", cfg.model_type == "lora"
    dtype = torch.bfloat16 if bf16 else torch.float32
    twinflow = cfg.resolved_method == "twinflow"
    targets = lora_targets_for(cfg.model_family, cfg.lora_targets) if lora else ()
    meta = build_meta_transformer(mc, dtype)
    extra = 0
    if twinflow:  # TwinFlow trains the any-step (target time, sign) embeddings in both modes
        with torch.device("meta"):
            extra = sum(p.numel() for p in adapter.add_anystep(meta).parameters())
    counts = count_params(meta, lora=lora, targets=targets, rank=cfg.lora_rank, extra_trainable=extra if lora else 0,
                          persistence_threshold=int(knobs.param_persistence_threshold))
    txt = text_tokens or adapter.default_text_len + MODEL_INPUTS.get(mc["_class_name"], (None, 0))[1]
    acts = model_activations(mc, batch=cfg.train_batch_size, resolution=res, text_tokens=txt, dtype=dtype,
                             lora_targets=targets, lora_rank=cfg.lora_rank,
                             anystep=adapter.add_anystep if twinflow else None)
    act_bytes = acts.peak(cfg.gradient_checkpointing, teacher=twinflow)
    layouts = []
    for stage, off_opt, off_par in LAYOUTS:
        lay = layout_memory(counts, act_bytes, stage=stage, offload_optimizer=off_opt, offload_param=off_par,
                            gpus_per_node=gpus, nodes=nodes, bf16=bf16, ema=cfg.use_ema, knobs=knobs,
                            overhead=overhead_gb * GiB)
        lay.fits = lay.total <= gpu_mem_gb * GiB * (1 - margin)
        lay.host_fits = None if host_mem_gb is None else lay.host_per_node <= host_mem_gb * GiB * (1 - margin)
        layouts.append(lay)
    ok = [lay for lay in layouts if lay.fits and lay.host_fits is not False]
    configured = next((lay for lay in layouts if (lay.stage, lay.offload_optimizer, lay.offload_param) ==
                       (cfg.zero_stage, cfg.offload_optimizer, cfg.offload_param)), None)
    settings = dict(family=cfg.model_family, model_type=cfg.model_type, lora_rank=cfg.lora_rank if lora else None,
                    method=cfg.resolved_method, resolution=res, image_tokens=(res // 16) ** 2, text_tokens=txt,
                    batch=cfg.train_batch_size, checkpointing=cfg.gradient_checkpointing,
                    precision="bf16" if bf16 else "fp32", ema=cfg.use_ema, gpus=gpus, nodes=nodes,
                    gpu_mem_gb=gpu_mem_gb, host_mem_gb=host_mem_gb, overhead_gb=overhead_gb, margin=margin,
                    optimizer="fused Adam" if knobs.fused_adam else "torch AdamW")
    return Plan(mc["_class_name"], counts, acts, settings, layouts, ok[0] if ok else None, configured)


def format_table(plan: Plan) -> str:
    """The plan as a fixed-width table (GiB per GPU; host GiB per node), with the recommendation."""
    s, c, g = plan.settings, plan.counts, (lambda b: f"{b / GiB:.1f}")
    mode = f"LoRA r{s['lora_rank']}" if s["model_type"] == "lora" else "full fine-tuning"
    lines = [f"{plan.model}: {c.total / 1e9:.3f}B params, {c.trainable / 1e6:,.1f}M trainable ({mode}), "
             f"{c.frozen / 1e9:.3f}B frozen",
             f"{s['method']}, {s['precision']}, {s['resolution']}px = {s['image_tokens']} image + {s['text_tokens']} "
             f"text tokens, batch {s['batch']}/GPU, checkpointing {'on' if s['checkpointing'] else 'off'}, EMA "
             f"{'on' if s['ema'] else 'off'}, {s['optimizer']}",
             f"{s['gpus'] * s['nodes']} GPU(s) = {s['nodes']} node(s) x {s['gpus']}, {s['gpu_mem_gb']:g} GiB/GPU, "
             f"fits = total <= {100 * (1 - s['margin']):.0f}% of it; GiB per GPU, host GiB per node", ""]
    head = f"{'layout':<24}{'params':>8}{'grads':>8}{'optim':>8}{'ema':>7}{'acts':>7}{'step':>7}{'total':>8}" \
           f"{'host':>8}  fits"
    lines += [head, "-" * len(head)]
    for lay in plan.layouts:
        mark = ("*" if lay is plan.configured else " ") + (">" if lay is plan.recommended else " ")
        fit = "yes" if lay.fits else "no"
        if lay.host_fits is False:
            fit += " (host no)"
        lines.append(f"{mark}{lay.name:<22}{g(lay.params):>8}{g(lay.grads):>8}{g(lay.optim):>8}{g(lay.ema):>7}"
                     f"{g(lay.acts):>7}{g(lay.step):>7}{g(lay.total):>8}{g(lay.host_per_node):>8}  {fit}")
    a = plan.activations
    lines += ["", f"total = params + optim + ema + max(grads + acts, step) + {s['overhead_gb']:g} GiB runtime; "
                  "grads include reduce buckets; step = optimizer-step transients",
              f"activations: {g(a.saved(False))} GiB saved without checkpointing, {g(a.saved(True))} GiB with; "
              f"one block {g(a.block)} GiB" + ("; TwinFlow teacher passes are no-grad (one block at a time)"
                                               if s["method"] == "twinflow" else ""),
              "* = configured layout, > = recommended"]
    rec = plan.recommended
    lines.append(f"recommended: {rec.name} ({g(rec.total)} GiB per GPU)" if rec else
                 "recommended: nothing fits - use more GPUs, gradient checkpointing, a smaller batch or LoRA")
    return "\n".join(lines)
