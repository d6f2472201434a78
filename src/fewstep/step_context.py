"""What a micro-step needs, as one typed object, and the two things every method does with it: draw this rank's next
batch of cached tensors, and call the model through the engine.

`fewstep.steps` (flow matching, Glance), `fewstep.twinflow_step` and `fewstep.validation` build on this module; none
imports another's internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from fewstep.data.reader import BatchReader
from fewstep.methods.transfer import copy_to


@dataclass
class StepContext:
    cfg: Any                    # fewstep.config.Config
    adapter: Any                # the model family's FlowModelAdapter
    engine: Any                 # the DeepSpeed engine wrapping the transformer
    dataset: Any                # fewstep.data.cache.CachedDataset (or anything with item(i), uncond, text)
    order: Any                  # fewstep.data.order.DataOrder: this rank's resumable sample order
    device: torch.device
    dtype: torch.dtype          # the training compute dtype (bf16 or fp32)
    backend: str = "torch"      # kernel backend (fewstep.kernels.resolve_backend)
    ema: Optional[Any] = None   # fewstep.ema.EMA over the fp32 master partitions, or None
    twinflow_times: list = field(default_factory=list)  # recent (t, tt) rows for the TensorBoard scatter
    reader: Optional[BatchReader] = None  # reads the dataset's next micro-batch ahead (made at the first draw)


def to_device(cond: dict, device, dtype) -> dict:
    """Move a batch of embeddings to the device; floating tensors also take the training dtype (masks keep theirs).
    Copies from the host do not wait for the device's queue (`fewstep.methods.transfer`)."""
    return {k: copy_to(v, device, dtype if torch.is_floating_point(v) else None) for k, v in cond.items()}


def next_batch(ctx: StepContext, with_uncond: bool = False) -> tuple[torch.Tensor, dict, Optional[dict]]:
    """This rank's next micro-batch (all of one bucket, so one latent shape): latents, caption embeddings (with
    caption dropout) and, if asked, the empty-prompt embeddings (TwinFlow's CFG target). Both carry the images' own
    conditioning where the family has some (`adapter.micro_cond`: SDXL's sizes and crop)."""
    cfg, ds, adapter = ctx.cfg, ctx.dataset, ctx.adapter
    layout = getattr(ds, "layout", None)  # buckets and entries; a plain dataset of same-shape items has none
    picks = ctx.order.next_items(layout)  # one bucket per micro-batch, and the caption variant drawn per sample
    if ctx.reader is None:
        ctx.reader = BatchReader(ds)
    items = ctx.reader.read(picks, upcoming=ctx.order.peek_items(layout))  # and starts reading the next draw
    indices = [i for i, _ in picks]
    x0 = copy_to(torch.stack([lat for lat, _ in items]), ctx.device, ctx.dtype)
    drop = torch.rand(len(items)) < cfg.caption_dropout_probability if cfg.caption_dropout_probability else None
    texts = [ds.uncond if drop is not None and drop[i] else t for i, (_, t) in enumerate(items)]
    samples = getattr(ds, "samples", None)  # with their plans (CachedDataset); synthetic data have none
    plans = [getattr(samples[i], "plan", None) for i in indices] if samples is not None else []
    image_cond = adapter.micro_cond(plans) if plans and all(p is not None for p in plans) else {}
    cond = to_device({**adapter.collate_cond(texts), **image_cond}, ctx.device, ctx.dtype)
    if not with_uncond:
        return x0, cond, None
    uncond = to_device({**adapter.collate_cond([ds.uncond] * len(items)), **image_cond}, ctx.device, ctx.dtype)
    return x0, cond, uncond


def velocity_fn(ctx: StepContext, guidance: Optional[float] = None) -> Callable:
    """model(x, sigma, cond, tt=None, sign=None) -> fp32 velocity, through the engine's module. `guidance`: the
    distilled-guidance value of a family that has one (default: the training value, `flux_guidance_value`)."""
    adapter, engine, dtype = ctx.adapter, ctx.engine, ctx.dtype
    guidance = ctx.cfg.flux_guidance_value if guidance is None else guidance

    def fn(x, sigma, cond, tt=None, sign=None):
        return adapter.forward(engine, x.to(dtype), sigma, cond, tt=tt, sign=sign, guidance=guidance).float()
    return fn
