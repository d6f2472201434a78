#!/usr/bin/env python
"""Training-step benchmark of the real architectures through fewstep's own engine and step code.

  python bench/train_step.py --family qwen_image --depth 60 --resolution 1024 --method twinflow --lora_rank 64
  python bench/train_step.py --family sdxl --depth 2 --resolution 1024   # SDXL UNet, transformer depth (1, 2, 2)
  python bench/train_step.py --smoke          # CPU: tiny model, one step, no figures claimed (CI)

Builds the denoiser from `configs/models/<family>.json` (the published architecture, random bf16 weights; `--depth`
keeps K transformer blocks, per-block figures are reported; for the SDXL UNet, real widths with every level's
transformer depth capped at K: `transformer_layers_per_block` (1, 2, 10) -> (1, 2, 2) at K = 2, resnets untouched),
feeds synthetic latents and text embeddings of the real shapes,
and runs warm-up then timed steps through `fewstep.engine` (deepspeed.initialize) and `fewstep.steps.make_step`
(flow matching or TwinFlow, gradient checkpointing on), exactly as `launcher/train.py` does. Reports s/step,
samples/s, achieved TFLOP/s and MFU from FLOPs counted with torch's FlopCounterMode over one whole step (forward with
grad, backward and every no-grad teacher/adversarial pass) against the bf16 matmul peak measured in the same run,
peak memory, and the split between time inside transformer calls and everything else (targets, EMA, optimizer).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = {"qwen_image": "qwen_image.json", "flux": "flux_dev.json", "sd3": "sd35_large.json",
               "sdxl": "sdxl.json"}
TEXT_LEN = {"qwen_image": 512, "flux": 512, "sd3": 333, "sdxl": 77}  # pipelines' defaults (SD3: 77 CLIP + 256 T5)
# config keys a family needs: SDXL is an epsilon-prediction base, trained as a flow model through diff2flow (TwinFlow)
FAMILY_OVERRIDES = {"sdxl": {"prediction_type": "epsilon", "diff2flow_enabled": True,
                             "twinflow_allow_diff2flow": True}}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen_image", choices=sorted(MODEL_FILES))
    p.add_argument("--depth", type=int, default=None,
                   help="transformer blocks to keep (default: all); SDXL: per-level transformer depth cap")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--method", default="twinflow", choices=("twinflow", "flow"))
    p.add_argument("--lora_rank", type=int, default=64, help="0 = full fine-tuning")
    p.add_argument("--teacher_rows", default="used", choices=("used", "all"),
                   help="TwinFlow: teacher passes on the used rows (default) or the whole batch (reference)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, one step: checks the script runs")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


class SyntheticDataset:
    """The CachedDataset interface over random tensors of the real shapes (latents, caption and empty embeddings)."""

    def __init__(self, latent_shape, cond, uncond, n=4):
        g = torch.Generator().manual_seed(0)
        self.latents = [torch.randn(latent_shape, generator=g) for _ in range(n)]
        self.samples = [type("S", (), {"caption": "c"})() for _ in range(n)]
        self.text = {"c": cond, "": uncond}

    def __len__(self):
        return len(self.latents)

    def item(self, i):
        return self.latents[i], self.text["c"]

    @property
    def uncond(self):
        return self.text[""]


def model_kwargs(family: str, depth: int | None) -> tuple[str, dict]:
    """(diffusers class name, constructor kwargs) of the family's shipped architecture at `depth` (module docstring)."""
    with open(os.path.join(REPO, "configs", "models", MODEL_FILES[family])) as fh:
        kwargs = json.load(fh)
    cls = kwargs.pop("_class_name")
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    if depth is not None:
        if "transformer_layers_per_block" in kwargs:  # a UNet: real widths, every level's transformer depth capped
            per = kwargs["transformer_layers_per_block"]
            per = [per] * len(kwargs["down_block_types"]) if isinstance(per, int) else per
            kwargs["transformer_layers_per_block"] = [min(n, depth) for n in per]
        elif "num_single_layers" in kwargs:  # Flux: keep the double/single proportion
            total = kwargs["num_layers"] + kwargs["num_single_layers"]
            kwargs["num_layers"] = max(1, round(depth * kwargs["num_layers"] / total))
            kwargs["num_single_layers"] = max(0, depth - kwargs["num_layers"])
        else:
            kwargs["num_layers"] = depth
    return cls, kwargs


def transformer_blocks(model) -> int:
    """Transformer blocks the denoiser runs per call: num_layers (+ single layers) of a transformer; a UNet's
    BasicTransformerBlocks over all levels (its mid block and every up block count: 70 for SDXL)."""
    if hasattr(model.config, "num_layers"):
        return model.config.num_layers + getattr(model.config, "num_single_layers", 0)
    return sum(len(ml) for name, ml in model.named_modules()
               if name.endswith("transformer_blocks") and isinstance(ml, torch.nn.ModuleList))


def build_transformer(args, adapter):
    if args.smoke:
        return adapter.load(f"tiny:{adapter.family}", with_text=False, with_vae=False).denoiser
    import diffusers

    cls, kwargs = model_kwargs(args.family, args.depth)
    cls = getattr(diffusers, cls)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise a fp32 copy of a 20B model
    try:
        with torch.device(device):
            model = cls(**kwargs)
    finally:
        torch.set_default_dtype(old)
    return model


def synthetic_inputs(args, adapter, transformer, smoke_res):
    cfgm = transformer.config
    unet = hasattr(cfgm, "cross_attention_dim")  # SDXL's UNet: text width cross_attention_dim
    d = cfgm.cross_attention_dim if unet else cfgm.joint_attention_dim
    L = 8 if args.smoke else TEXT_LEN[args.family]
    cond = {"prompt_embeds": torch.randn(L, d)}
    if "pooled_prompt_embeds" in adapter.cond_keys:  # SDXL: add_embedding's input less its 6 embedded time ids
        pooled = (cfgm.projection_class_embeddings_input_dim - 6 * cfgm.addition_time_embed_dim if unet
                  else cfgm.pooled_projection_dim)
        cond["pooled_prompt_embeds"] = torch.randn(pooled)
    if "prompt_embeds_mask" in adapter.cond_keys:
        cond["prompt_embeds_mask"] = torch.ones(L, dtype=torch.long)
    packed = 4 if adapter.packed else 1
    channels = cfgm.in_channels // packed
    factor = 4 if args.smoke and args.family == "qwen_image" else (1 if args.smoke else 8)
    side = smoke_res // factor if args.smoke else args.resolution // 8
    uncond = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in cond.items()}
    return (channels, side, side), cond, uncond


def measured_peak_tflops() -> float:
    """bf16 matmul rate of this device, measured (8192^3 products, median of 20)."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192 ** 3 / sorted(times)[len(times) // 2] / 1e12


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv):
    args = parse(argv)
    if args.family in FAMILY_OVERRIDES and args.method != "twinflow":
        raise SystemExit(f"bench/train_step.py: {args.family} is an epsilon-prediction base: only --method twinflow "
                         "(with diff2flow) trains it")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from torch.utils.flop_counter import FlopCounterMode

    from fewstep.config import load_config
    from fewstep.data.dataset import DataOrder
    from fewstep.ema import EMA
    from fewstep.engine.deepspeed_engine import build_engine, master_partitions
    from fewstep.engine.distributed import setup_distributed, teardown
    from fewstep.kernels import resolve_backend
    from fewstep.lora import count_params, prepare_trainable
    from fewstep.models import get_adapter
    from fewstep.step_context import StepContext
    from fewstep.steps import Phase, make_step

    if args.smoke:
        args.steps, args.warmup, args.batch = 1, 1, 1
    info = setup_distributed()
    smoke_res = 32
    overrides = {"model_family": args.family, "pretrained_model_name_or_path": f"tiny:{args.family}",
                 "model_type": "lora" if args.lora_rank else "full", "lora_rank": max(args.lora_rank, 1),
                 "train_batch_size": args.batch, "gradient_checkpointing": True, "zero_stage": 2,
                 "mixed_precision": "bf16", "use_ema": args.method == "twinflow", "ema_decay": 0.99,
                 **({"twinflow_enabled": True, "twinflow_adversarial_enabled": True,
                     "twinflow_teacher_rows": args.teacher_rows} if args.method == "twinflow" else {}),
                 **FAMILY_OVERRIDES.get(args.family, {})}
    cfg = load_config(None, overrides)
    adapter = get_adapter(args.family)
    transformer = build_transformer(args, adapter)
    n_total = sum(p.numel() for p in transformer.parameters())
    trainable = prepare_trainable(cfg, adapter, transformer, anystep_embeddings=args.method == "twinflow")
    n_train = count_params(trainable)
    engine, _, _ = build_engine(cfg, transformer, trainable)
    latent_shape, cond, uncond = synthetic_inputs(args, adapter, transformer, smoke_res)
    ds = SyntheticDataset(latent_shape, cond, uncond)
    backend = resolve_backend(cfg.fused_kernels)
    ctx = StepContext(cfg=cfg, adapter=adapter, engine=engine, dataset=ds, dtype=torch.bfloat16, device=info.device,
                      order=DataOrder(len(ds), args.batch, 0, 1, 0), backend=backend,
                      ema=EMA(master_partitions(engine), cfg.ema_decay, backend) if cfg.use_ema else None)
    step_fn = make_step(cfg.resolved_method, Phase(cfg.resolved_method, 1), ctx)

    losses = []  # read after the timing: a step whose loss is NaN times nothing worth reporting

    def one_step():
        loss, _ = step_fn(0)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())

    for _ in range(args.warmup):
        one_step()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps

    # One instrumented step: FLOPs of everything run, and wall time spent inside transformer calls.
    inside = {"t": 0.0, "start": 0.0}
    module = engine.module

    def pre(*_):
        sync()
        inside["start"] = time.perf_counter()

    def post(*_):
        sync()
        inside["t"] += time.perf_counter() - inside["start"]

    with FlopCounterMode(display=False) as fc:
        one_step()
    flops = fc.get_total_flops()
    h1, h2 = module.register_forward_pre_hook(pre), module.register_forward_hook(post)
    sync()
    t0 = time.perf_counter()
    loss, _ = step_fn(0)
    losses.append(loss.detach().float())
    sync()
    fwd_part = inside["t"]
    tb = time.perf_counter()
    engine.backward(loss)
    sync()
    bwd = time.perf_counter() - tb
    engine.step()
    sync()
    instrumented = time.perf_counter() - t0
    h1.remove(), h2.remove()
    model_time = fwd_part + bwd
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    grad_norm = engine.get_global_grad_norm()
    finite = finite and (grad_norm is None or math.isfinite(float(grad_norm)))
    peak = measured_peak_tflops()
    achieved = flops / step_s / 1e12
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    blocks = transformer_blocks(transformer)
    device = "cpu (smoke, not a figure)" if args.smoke else "cpu"
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else device,
           "family": args.family, "blocks": blocks, "resolution": smoke_res if args.smoke else args.resolution,
           "batch": args.batch, "method": args.method, "teacher_rows": args.teacher_rows,
           "lora_rank": args.lora_rank, "params_base": n_total,
           "params_trainable": n_train, "s_per_step": step_s, "s_per_step_per_block": step_s / max(blocks, 1),
           "samples_per_s": args.batch / step_s, "tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
           "peak_bf16_tflops_measured": peak, "mfu": achieved / peak if peak == peak else float("nan"),
           "peak_mem_gib": mem, "model_pass_share": model_time / instrumented,
           "non_model_share": 1 - model_time / instrumented, "finite_losses_and_grad_norm": finite}
    if info.is_main:
        print("| metric | value |\n|---|---|")
        for k, v in res.items():
            print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1)
    teardown()  # as launcher/train.py ends: gloo's threads can otherwise abort the exit of a multi-rank run
    if not finite:  # the table says so too (finite_losses_and_grad_norm); the next runs of a GPU check still go on
        print("bench/train_step.py: WARNING: a loss or the gradient norm was not finite: these timings are not "
              "figures", file=sys.stderr)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
