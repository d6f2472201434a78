"""Per-GPU memory of each ZeRO layout (DeepSpeed 0.19.8 as fewstep configures it), the plan and its table.

Per GPU, with N = GPUs in the run, P = all parameters, Pt = trainable ones, w = 2 bytes (bf16) or 4 (fp32):

    params  w*P (stages 0-2) | w*P/N + persistent small params + gathered window (stage 3): the live parameters
            w*max(largest module, min(P, max_live + prefetch)), freed again before the optimizer step
    grads   w*Pt (stage 0; stage 1 until the reduce at the end of backward) | w*Pt/N (stages 2, 3), plus the reduce
            buckets: w*reduce_bucket_size (x2 with overlap_comm at stages 1-2), all-reduce buckets at stage 0
    optim   fp32 master 4*Pt (at stage 0 only with bf16; DeepSpeed clones it even in fp32 at stages >= 1) + Adam
            m, v 8*Pt; divided by N at stages >= 1
    ema     fewstep's EMA shadows this rank's fp32 master partition: 4*Pt (/N at stages >= 1); under LoRA that is
            the adapter's (tiny) partition
    step    optimizer-step transients: the reduced gradient partition w*Pt/N, its fp32 copy 4*Pt/N (bf16; always at
            stage 3) and torch AdamW's temporaries (foreach on CUDA: one 4*Pt/N list; DeepSpeed's fused Adam: none);
            stage 3 steps one optimizer sub-group (sub_group_size elements, 1e9) at a time, so there Pt/N is the
            largest sub-group's size; stage 3 keeps its reduce bucket here too
    acts    activation peak (fewstep.planning.activations), TwinFlow's no-grad teacher passes included

    total = params + optim + ema + max(grads + acts, step) + overhead   (stage 3: the window goes with grads + acts)

Optimizer offload moves master, m, v, EMA and the fp32 gradients to the host and runs the step there; parameter
offload (stage 3) moves the w*P/N partition. Host memory is reported per node, allocation by allocation
(fewstep.planning.host): on a GPU run the pinned ones are rounded up to a power of two, as torch's pinned allocator
does.
On CPU (gloo, CI) two more terms were measured: gloo's all-gather copies its output through a staging buffer (the flat
weights, w*P, at stages 1-2; a coalesced fetch at stage 3) and torch AdamW's CPU for-loop holds two temporaries.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from fewstep.planning.activations import Activations, cached_activations, default_text_tokens
from fewstep.planning.host import NOTE_REMEDY_MB, host_buffers, host_bytes, pinned_limits, sub_groups
from fewstep.planning.model import AnyStep, ParamCounts, build_meta_transformer, count_params, model_config_source
from fewstep.planning.resolution import training_resolution

GiB = 2 ** 30


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
    device: str = "cuda"  # "cpu": gloo collectives and torch AdamW's for-loop (measured in CI); "cuda" pins offload
    sub_group_size: float = 1e9  # ZeRO-3's optimizer sub-groups (one host allocation each)
    accumulation: int = 1  # gradient_accumulation_steps: > 1 adds ZeRO-1/2 offload's per-tensor host accumulators
    pinned_round_max: float = float("inf")  # torch rounds pinned blocks up to a power of two up to this size (bytes)
    pinned_cache_max: float = float("inf")  # and caches freed ones up to this size (`host.pinned_limits`)

    @property
    def adam_temporaries(self) -> int:
        """fp32 partition-sized temporaries of one torch AdamW step: the foreach path (CUDA) makes sqrt(v) a new
        list; the CPU for-loop computes `v.sqrt() / c` (two alive at once). Fused Adam: none."""
        return 0 if self.fused_adam else (1 if self.device == "cuda" else 2)


@dataclass
class Layout:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    params: float  # bytes per GPU, each term as in the module docstring
    grads: float
    optim: float
    ema: float
    acts: float
    step: float
    overhead: float
    host_per_node: float  # as allocated: pinned buffers rounded up to a power of two (fewstep.planning.host)
    host_exact: float = 0.0  # the same buffers at their exact sizes, per node
    window: float = 0.0  # ZeRO-3 gathered weights (inside params), freed before the optimizer step
    gpus: int = 1
    total: float = 0.0
    load: float = 0.0  # peak while loading the model and building the engine
    load_min: float = 0.0  # the same where DeepSpeed flattens on the host for want of GPU room (ZeRO-1/2); a plan
    #                         for a GPU without that room shows it as `load`
    export: float = 0.0  # peak while writing a full export (rank 0; its shard buffer is host memory on a GPU)
    export_host: float = 0.0  # rank 0's host memory for the shard being written (full fine-tuning)
    fits: bool = False
    host_fits: bool | None = None  # None: no --host_mem_gb given

    @property
    def name(self) -> str:
        off = "+".join(k for k, on in (("opt", self.offload_optimizer), ("param", self.offload_param)) if on)
        return f"ZeRO-{self.stage}" + (f" offload {off}" if off else "")


def layout_memory(c: ParamCounts, acts: float, *, stage: int, offload_optimizer: bool = False,
                  offload_param: bool = False, gpus: int = 1, nodes: int = 1, bf16: bool = True, ema: bool = False,
                  knobs: ZeroKnobs = ZeroKnobs(), overhead: float = 0.0) -> Layout:
    """Per-GPU bytes of one ZeRO layout on `gpus` GPUs in all, over `nodes` nodes (module docstring: each term)."""
    if (offload_param and stage != 3) or (offload_optimizer and stage == 0):
        raise ValueError(f"ZeRO stage {stage} cannot offload {'parameters' if offload_param else 'the optimizer'}: "
                         "optimizer offload needs stage >= 1, parameter offload stage 3")
    n = gpus
    w, P, Pt = (2 if bf16 else 4), c.total, c.trainable
    shard = Pt if stage == 0 else Pt / n  # this rank's share of what the optimizer owns
    window = 0.0
    if stage < 3:
        params = w * P + c.buffer_bytes
    else:
        window = w * max(c.largest_module, min(P, knobs.max_live_parameters + knobs.prefetch_bucket_size))
        if knobs.device == "cpu":  # gloo stages each coalesced fetch (<= prefetch bucket) through a copy
            window += w * min(P, knobs.prefetch_bucket_size + c.largest_module)
        params = (0 if offload_param else w * P / n) + w * c.persistent + c.buffer_bytes + window
    buckets = w * knobs.reduce_bucket_size * (2 if knobs.overlap_comm and stage < 3 else 1)
    if stage == 0:
        grads = w * Pt + (w * min(Pt, knobs.allreduce_bucket_size) if n > 1 else 0)
    elif stage == 1:
        grads = w * Pt + buckets
    else:
        grads = (0 if offload_optimizer else w * Pt / n) + buckets
    master = 4 * Pt if (stage > 0 or bf16) else 0
    optim = 0 if offload_optimizer else (master + 8 * Pt) / (1 if stage == 0 else n)
    shadow = 4 * shard if ema else 0
    step = 0.0  # with optimizer offload the step runs on the host
    if not offload_optimizer:  # ZeRO-3 steps one sub-group at a time: its transients are the largest sub-group's
        g = shard if stage < 3 else max(sub_groups([-(-t // n) for t in (c.trainable_sizes or (Pt,))],
                                                   knobs.sub_group_size))
        fp32_grads = 4 * g if (bf16 or stage == 3) else 0
        step = w * g + fp32_grads + knobs.adam_temporaries * 4 * g
    if stage == 3:  # ZeRO-3 allocates its reduce bucket once, at initialize: it is there at the step too
        step += buckets
    if knobs.device == "cpu" and 0 < stage < 3:  # gloo's all-gather of the updated weights copies the flat buffer
        step = max(step, w * P)
    bufs = host_buffers(c, stage=stage, offload_optimizer=offload_optimizer, offload_param=offload_param, n=n, w=w,
                        ema=ema, knobs=knobs)
    lay = Layout(stage, offload_optimizer, offload_param, params, grads, optim, 0 if offload_optimizer else shadow,
                 acts, step, overhead, host_bytes(bufs, knobs) * (gpus // nodes),
                 host_bytes(bufs, knobs, exact=True) * (gpus // nodes), window, gpus)
    lay.total = params - window + optim + lay.ema + max(grads + acts + window, step) + overhead
    lay.load, lay.load_min, lay.export, lay.export_host = stage_peaks(c, lay, w, knobs)
    return lay


def stage_peaks(c: ParamCounts, lay: Layout, w: int, knobs: ZeroKnobs) -> tuple[float, float, float]:
    """(load, export, export host) peaks of a layout, per GPU, in bytes (see fewstep.engine.loading and
    fewstep.full_export):

    - load: the state after `deepspeed.initialize`: parameters without the gathered window, fp32 masters (Adam's
      moments come at the first step), EMA and ZeRO-3's gradient partition (allocated up front); plus the larger of two
      transients: the one module `zero.Init` holds whole while partitioning it (gloo stages the broadcast: twice),
      and the copy DeepSpeed makes while flattening the trainable weights: ZeRO-1/2 flatten them on the GPU when it
      has room (w*Pt) and on the host otherwise, ZeRO-3 always through the host (its partition, w*Pt/N: a host
      transient on a GPU);
    - load_min: the load peak when ZeRO-1/2's flattening takes the host, which DeepSpeed chooses by itself when the
      GPU lacks room: what a layout needs to load at all;
    - export (validation, then the exports): that state with Adam's moments, plus the larger of the validation
      forward's gathered window and, under ZeRO-3, one gathered block (twice with gloo's staging copy) with, on
      rank 0 of a full fine-tune, the shard being assembled (at most SHARD_BYTES plus one block: host memory on a
      GPU, the same memory on the CPU).
    """
    from fewstep.full_export import SHARD_BYTES

    cpu, n = knobs.device == "cpu", lay.gpus
    static = lay.params - lay.window + lay.optim + lay.ema + lay.overhead
    adam = 0.0 if lay.offload_optimizer else 8 * c.trainable / (1 if lay.stage == 0 else n)
    # ZeRO-2/3 keep their gradient partition between steps (ZeRO-3 allocates it at initialize); stages 0-1 free it
    kept_grads = 0.0 if lay.stage < 2 else max(
        lay.grads - w * knobs.reduce_bucket_size * (2 if knobs.overlap_comm and lay.stage < 3 else 1), 0.0)
    build = w * c.largest_module * (2 if cpu else 1) if lay.stage == 3 else 0.0
    # ZeRO-1/2 flatten the trainable weights where there is room (a copy); ZeRO-3 its partitions through the host
    flatten = 0.0 if lay.stage == 0 else w * c.trainable / n * cpu if lay.stage == 3 else w * c.trainable
    base = static - adam + (kept_grads if lay.stage == 3 else 0.0)
    load = base + max(build, flatten)
    load_min = base + max(build, flatten if lay.stage == 3 or cpu else 0.0)
    gathered = w * c.largest_block * (2 if cpu else 1) if lay.stage == 3 else 0.0
    shard = (min(SHARD_BYTES, w * c.total) + w * c.largest_block) if c.trainable == c.total else 0.0
    export = static + kept_grads + max(gathered + (shard if cpu else 0.0), lay.window)
    return load, load_min, export, shard


# every layout, least communication first: lowest stage without offload, then optimizer, then parameter offload
LAYOUTS = [(0, False, False), (1, False, False), (2, False, False), (3, False, False), (1, True, False),
           (2, True, False), (3, True, False), (3, False, True), (3, True, True)]


@dataclass
class Plan:
    model: str  # the denoiser class (a transformer or a UNet)
    counts: ParamCounts
    activations: Activations
    settings: dict
    layouts: list
    recommended: Layout | None
    configured: Layout | None  # the layout the config asks for


def as_config(cfg):
    """A validated fewstep Config from a Config, a dict (SimpleTuner '--key' spelling accepted) or a JSON path."""
    from fewstep.config import Config, load_config

    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, os.PathLike)):
        return load_config(str(cfg))
    return load_config(None, dict(cfg))


def knobs_for(cfg, device: str = "cuda") -> ZeroKnobs:
    """ZeroKnobs from the DeepSpeed config fewstep generates for `cfg` (its `deepspeed_config` overrides included);
    overlap_comm is on exactly on CUDA, as the engine sets it."""
    from fewstep.engine.deepspeed_engine import build_ds_config

    z = build_ds_config(dataclasses.replace(cfg, offload_optimizer=False, offload_param=False), stage=3)
    z, d = z["zero_optimization"], ZeroKnobs()
    return ZeroKnobs(float(z.get("reduce_bucket_size", d.reduce_bucket_size)),
                     float(z.get("allreduce_bucket_size", d.allreduce_bucket_size)), device == "cuda",
                     float(z.get("stage3_max_live_parameters", d.max_live_parameters)),
                     float(z.get("stage3_prefetch_bucket_size", d.prefetch_bucket_size)),
                     float(z.get("stage3_param_persistence_threshold", d.param_persistence_threshold)),
                     cfg.optimizer == "deepspeed", device, float(z.get("sub_group_size", d.sub_group_size)),
                     cfg.gradient_accumulation_steps, *pinned_limits())


def configured_layout(cfg) -> tuple[int, bool, bool]:
    """(stage, optimizer offloaded, parameters offloaded) as the trainer runs `cfg`: from the DeepSpeed config it
    builds, where a `deepspeed_config` file's stage and offload sections win over fewstep's options (DeepSpeed
    offloads parameters at stage 3 only)."""
    from fewstep.engine.deepspeed_engine import build_ds_config
    from fewstep.engine.ds_config_checks import offload_device, used_offload_device

    z = build_ds_config(cfg)["zero_optimization"]
    return (int(z["stage"]), offload_device(z, "offload_optimizer") not in ("none", None),
            used_offload_device(z, "offload_param") not in ("none", None))


def plan_memory(cfg, gpus: int = 1, nodes: int | None = None, gpu_mem_gb: float = 80.0,
                host_mem_gb: float | None = None, *, model_config: str | dict | None = None,
                text_tokens: int | None = None, overhead_gb: float = 2.0, margin: float = 0.05,
                knobs: ZeroKnobs | None = None) -> Plan:
    """Memory of every ZeRO layout (stages 0-3, optimizer / parameter offload) for `cfg` on `gpus` GPUs in all.

    cfg: a fewstep Config, config dict or JSON path. nodes: default ceil(gpus / 8). gpu_mem_gb, host_mem_gb: GiB per
    GPU, per node. model_config: a diffusers config path or dict instead of the family's shipped one. A layout fits
    when its training total (overhead_gb of CUDA context / NCCL included), load and export peaks are within
    (1 - margin) of gpu_mem_gb; the
    recommendation is the first fitting layout of `LAYOUTS`. The resolution is the one the trainer would use
    (`fewstep.planning.resolution`: the data backend's, or the config's `resolution`); a data backend the trainer would
    reject raises its DataError (a ValueError). `settings` records where the resolution and the architecture come
    from (`resolution_source`, `model_source`), and `format_table` prints both.
    """
    cfg = as_config(cfg)
    nodes = nodes or -(-gpus // 8)
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ValueError(f"gpus must be a positive multiple of nodes, got gpus={gpus}, nodes={nodes}")
    from fewstep.models import get_adapter

    adapter = get_adapter(cfg.model_family)
    resolution = training_resolution(cfg, adapter)
    res = resolution.pixels
    if res % 16:
        raise ValueError(f"resolution must be a multiple of 16 (VAE /8, then 2x2 patches or a UNet's downsampling), "
                         f"got {res} (from {resolution.source})")
    mc, model_source = (model_config, "architecture: model_config given as a dict") if isinstance(model_config, dict) \
        else model_config_source(cfg.model_family, cfg.pretrained_model_name_or_path, model_config)
    knobs = knobs or knobs_for(cfg)
    bf16, lora, twinflow = cfg.bf16, cfg.model_type == "lora", cfg.resolved_method == "twinflow"
    dtype = torch.bfloat16 if bf16 else torch.float32
    targets = tuple(cfg.lora_targets or adapter.default_lora_targets) if lora else ()
    meta = build_meta_transformer(mc, dtype)
    extra, anystep = (), AnyStep(adapter.family) if twinflow else None
    if twinflow:  # TwinFlow trains its any-step (target time, sign) embeddings in both modes (width: anystep_dim)
        with torch.device("meta"):
            extra = tuple(p.numel() for p in anystep(meta).parameters())
    counts = count_params(meta, lora=lora, targets=targets, rank=cfg.lora_rank, extra_trainable=extra,
                          persistence_threshold=int(knobs.param_persistence_threshold))
    txt = text_tokens or default_text_tokens(mc["_class_name"], adapter.default_text_len)
    acts = cached_activations(json.dumps(mc, sort_keys=True), cfg.train_batch_size, res, txt, dtype, targets,
                              cfg.lora_rank, anystep)
    act_bytes = acts.peak(cfg.gradient_checkpointing, teacher=twinflow)
    layouts = []
    for stage, off_opt, off_par in LAYOUTS:
        lay = layout_memory(counts, act_bytes, stage=stage, offload_optimizer=off_opt, offload_param=off_par,
                            gpus=gpus, nodes=nodes, bf16=bf16, ema=cfg.use_ema, knobs=knobs,
                            overhead=overhead_gb * GiB)
        if lay.load > gpu_mem_gb * GiB:  # no room for ZeRO-1/2's flattening copy: DeepSpeed makes it on the host
            lay.load = lay.load_min
        lay.fits = max(lay.total, lay.load, lay.export) <= gpu_mem_gb * GiB * (1 - margin)  # every stage's peak
        lay.host_fits = None if host_mem_gb is None else lay.host_per_node <= host_mem_gb * GiB * (1 - margin)
        layouts.append(lay)
    fitting = [lay for lay in layouts if lay.fits and lay.host_fits is not False]
    want = configured_layout(cfg)  # (reads the deepspeed_config file: once)
    configured = next((lay for lay in layouts if (lay.stage, lay.offload_optimizer, lay.offload_param) == want), None)
    settings = dict(model_type=cfg.model_type, lora_rank=cfg.lora_rank if lora else None, method=cfg.resolved_method,
                    resolution=res, resolution_source=resolution.source, model_source=model_source,
                    image_tokens=(res // 16) ** 2, text_tokens=txt, batch=cfg.train_batch_size,
                    checkpointing=cfg.gradient_checkpointing, precision="bf16" if bf16 else "fp32", ema=cfg.use_ema,
                    gpus=gpus, nodes=nodes, gpu_mem_gb=gpu_mem_gb, host_mem_gb=host_mem_gb, overhead_gb=overhead_gb,
                    margin=margin, optimizer="fused Adam" if knobs.fused_adam else "torch AdamW",
                    pinned_round_max=knobs.pinned_round_max)
    return Plan(mc["_class_name"], counts, acts, settings, layouts, fitting[0] if fitting else None, configured)


def pinned_note(layouts: list, round_max: float, worth: float = 0.05) -> list[str]:
    """Lines naming the layouts whose host memory torch's power-of-two pinned blocks inflate (by more than `worth` and
    1 GiB), and the remedy."""
    hit = [lay for lay in layouts if lay.host_per_node - lay.host_exact > max(worth * lay.host_exact, GiB)]
    if not hit:
        return []
    m = NOTE_REMEDY_MB
    remedy = (f"PYTORCH_ALLOC_CONF=pinned_max_round_threshold_mb:{m},pinned_max_cached_size_mb:{m} pins blocks above "
              f"{m} MiB at their exact size (torch 2.13's source; untested on a GPU here); the plan reads it when set"
              if round_max == float("inf") else
              f"PYTORCH_ALLOC_CONF in effect: blocks above {round_max / 2 ** 20:g} MiB are exact; these are smaller")
    gib = lambda lay: f"{lay.name} {lay.host_per_node / GiB:.1f} / {lay.host_exact / GiB:.1f}"  # noqa: E731
    return ["pinned host buffers are rounded up to a power of two each (torch's pinned allocator); host GiB per node "
            "as allocated / exact: " + ", ".join(map(gib, hit)), "  " + remedy]


def format_table(plan: Plan) -> str:
    """The plan as a fixed-width table (GiB per GPU, host GiB per node) with the recommendation."""
    s, c, a = plan.settings, plan.counts, plan.activations
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    mode = f"LoRA r{s['lora_rank']}" if s["model_type"] == "lora" else "full fine-tuning"
    lines = [f"{plan.model}: {c.total / 1e9:.3f}B params, {c.trainable / 1e6:,.1f}M trainable ({mode}), "
             f"{c.frozen / 1e9:.3f}B frozen", s["model_source"],
             f"resolution: {s['resolution']}px, from {s['resolution_source']}",
             f"{s['method']}, {s['precision']}, {s['resolution']}px = {s['image_tokens']} image + {s['text_tokens']} "
             f"text tokens, batch {s['batch']}/GPU, checkpointing {'on' if s['checkpointing'] else 'off'}, "
             f"EMA {'on' if s['ema'] else 'off'}, {s['optimizer']}",
             f"{s['gpus']} GPU(s) = {s['nodes']} node(s) x {s['gpus'] // s['nodes']}, {s['gpu_mem_gb']:g} GiB per GPU "
             f"(fits: total, load and export <= {100 * (1 - s['margin']):.0f}%)" +
             (f", {s['host_mem_gb']:g} GiB host per node" if s["host_mem_gb"] else ""), ""]
    head = (f"  {'layout':<24}{'params':>7}{'grads':>7}{'optim':>7}{'ema':>6}{'acts':>6}{'step':>6}{'total':>7}"
            f"{'load':>6}{'export':>7}{'host':>7}  fits")
    lines += [head, "-" * len(head)]
    for lay in plan.layouts:
        mark = ("*" if lay is plan.configured else " ") + (">" if lay is plan.recommended else " ")
        fit = ("yes" if lay.fits else "no") + (" (host: no)" if lay.host_fits is False else "")
        lines.append(f"{mark}{lay.name:<24}{g(lay.params):>7}{g(lay.grads):>7}{g(lay.optim):>7}{g(lay.ema):>6}"
                     f"{g(lay.acts):>6}{g(lay.step):>6}{g(lay.total):>7}{g(lay.load):>6}{g(lay.export):>7}"
                     f"{g(lay.host_per_node):>7}  {fit}")
    lines += ["", f"GiB per GPU; host = GiB per node. total = params + optim + ema + max(grads + acts, step) + "
                  f"{s['overhead_gb']:g} runtime",
              "(grads include reduce buckets; step = optimizer-step transients; ZeRO-3 params include the gathered "
              "window, which goes with grads + acts)",
              "load: peak while loading and building the engine (ZeRO-3: partitioned as built; ZeRO-1/2 flatten the "
              "trainable weights on the GPU, or on the host when the GPU lacks room); export: peak of a "
              "full export, one block gathered at a time" + (f" (+ {g(plan.layouts[0].export_host)} GiB host on "
                                                              "rank 0 for the shard being written)"
                                                              if plan.layouts[0].export_host else ""),
              f"activations: {g(a.saved(False))} GiB saved without checkpointing, {g(a.saved(True))} GiB with; one "
              f"block {g(a.block)} GiB" + ("; TwinFlow teacher passes run without grad, a block at a time"
                                            if s["method"] == "twinflow" else ""),
              "* configured layout   > recommended (least communication that fits)"]
    lines += pinned_note(plan.layouts, s["pinned_round_max"])
    rec = plan.recommended
    lines.append(f"recommended: {rec.name}, {g(rec.total)} GiB per GPU" if rec else
                 "recommended: nothing fits - add GPUs, turn on gradient_checkpointing, lower the batch, or use LoRA")
    return "\n".join(lines)
