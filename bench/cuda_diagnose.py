#!/usr/bin/env python
"""Bisect the two CUDA-only failures of the first GPU check (bench/RESULTS.md, 2026-12-04), in one short run.

1. `launcher/train.py` (tiny:flux, TwinFlow LoRA, bf16, ZeRO-2) found the loss or the gradients non-finite at step 1,
   every try, on an H200; the same config trains on CPU (with the Triton kernels under the interpreter too).
2. `launcher/sample.py` on a TwinFlow LoRA gave a CUDA bf16 image at relative distance 1.37 from the CPU fp32 image
   of the same seed (bf16 vs fp32 on the CPU: 0.02). Explained since (2026-12-05) without CUDA: that box's torch 2.11
   draws CPU bf16 normals from another stream than fp32 ones, and the pipeline drew its start noise in its dtype; an
   emulation of it gives 1.34-1.37 on the CPU. The start noise is now drawn in fp32 (`start_noise`); Part A's first
   line measures the two streams of the torch it runs on.

Part A (sampling): the stock tiny FLUX pipeline, 1 Euler step from the same CPU noise, on cpu fp32 (reference),
cuda fp32 and cuda bf16; then the same with TwinFlow's any-step embeddings attached (zero-initialised: output must not
change) and a TwinFlowScheduler. Prints the relative distance of each image to the reference: a device bug shows in
cuda fp32, a precision one only in bf16, an any-step/scheduler one only in the TwinFlow rows; and the first
transformer module (in call order) whose output is more than 0.5 away from the reference's, which names the layer,
and the module furthest away.

Part B (training): 3 steps of the GPU check's training config, then one variant per suspect: the same run on this
machine's CPU (the GPU box's torch without CUDA: a torch-version cause, not a CUDA one), the teacher passes on the
whole batch (as the failing run had them), cuDNN attention off (torch >= 2.11 prefers it for bf16 on Hopper),
attention in SDPA's math kernel only, fused kernels off, overlap_comm off (then contiguous_gradients too; on the CPU
neither ran: its accelerator is synchronised, so ZeRO-2 makes no reduction stream), fp32, no adversarial branch, no EMA, plain flow matching, ZeRO stage 0. Each row: exit status, the
steps that were applied, and the trainer's own line naming what was non-finite (loss, gradients, this rank's
non-finite terms and, with `nan_trace`, the first module whose output or output gradient went non-finite, e.g.
`forward: single_transformer_blocks.0.attn (Attention) output in forward pass 2, inputs finite`). The first variant
that trains names the culprit.

    python bench/cuda_diagnose.py [--out DIR] [--parts a,b] [--deadline-s S]
(about 20 s per training row; the table is rewritten after each row, so a run stopped early keeps its rows)
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE_CONFIG = {"model_family": "flux", "model_type": "lora", "pretrained_model_name_or_path": "tiny:flux",
               "data_backend_config": "configs/demo/multidatabackend.json", "use_ema": True, "ema_decay": 0.99,
               "twinflow_enabled": True, "twinflow_target_step_count": 2, "twinflow_adversarial_enabled": True,
               "learning_rate": 1e-3, "lora_rank": 8, "train_batch_size": 4, "max_train_steps": 3,
               "mixed_precision": "bf16", "checkpointing_steps": 0, "validation_steps": 0,
               "validation_guidance": 0.0, "report_to": "none", "nan_trace": True}
# "_env": environment changes; "_sdpa": torch.backends.cuda switches set before the trainer starts
VARIANTS = [("as the GPU check", {}),
            ("on the CPU (no CUDA)", {"_env": {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}}),
            ("teacher passes on the whole batch", {"twinflow_teacher_rows": "all"}),  # as on 2026-12-04
            ("cuDNN attention off", {"_sdpa": {"enable_cudnn_sdp": False}}),
            ("SDPA math only", {"_sdpa": {"enable_cudnn_sdp": False, "enable_flash_sdp": False,
                                          "enable_mem_efficient_sdp": False}}),
            ("fused_kernels off", {"fused_kernels": "off"}),
            ("overlap_comm off", {"deepspeed_config": {"zero_optimization": {"overlap_comm": False}}}),
            ("overlap_comm and contiguous_gradients off",
             {"deepspeed_config": {"zero_optimization": {"overlap_comm": False, "contiguous_gradients": False}}}),
            ("fp32", {"mixed_precision": "no"}), ("no adversarial branch", {"twinflow_adversarial_enabled": False}),
            ("no EMA", {"use_ema": False, "twinflow_allow_no_ema_teacher": True}), ("flow matching (no TwinFlow)", {"twinflow_enabled": False}),
            ("ZeRO stage 0", {"zero_stage": 0})]


def rel(a, b) -> float:
    """||a - b|| / ||b|| (0 when both are zero, inf when only b is)."""
    diff, norm = float((a.double().cpu() - b.double().cpu()).norm()), float(b.double().cpu().norm())
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def randn_streams() -> str:
    """This torch's CPU normals from one seed in bf16 against fp32: about 0.002 (rounding) where both are one stream
    (torch 2.13), about 1.4 where bf16 has its own (the first GPU check's torch 2.11, its 1.37 sampling mismatch)."""
    import torch

    fp32, bf16 = (torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=d)
                  for d in (torch.float32, torch.bfloat16))
    return (f"torch {torch.__version__}: CPU randn bf16 vs fp32 from one seed: rel. distance {rel(bf16, fp32):.4f}, "
            f"bf16 max |x| {bf16.abs().max():.2f} (the pipelines' start noise is drawn in fp32 either way)")


def part_a() -> list[str]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    import fewstep  # noqa: F401
    from fewstep.models import anystep, get_adapter
    from fewstep.models.tiny import ensure_tiny_pipeline
    from fewstep.schedulers import TwinFlowScheduler

    adapter = get_adapter("flux")
    path = str(ensure_tiny_pipeline("flux"))
    rows = ["| pipeline | device | dtype | image: rel. distance to cpu fp32 | image finite | prompt embeddings: rel. "
            f"distance to cpu fp32 (finite) | transformer modules against cpu fp32: first over {DIVERGED} · "
            "largest · the output (rel. distances) |", "|---|---|---|---:|---|---|---|"]
    gpu = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU (the dry run): cpu bf16 only
    for twin in (False, True):
        ref = emb_ref = None
        for device, dtype in dict.fromkeys((("cpu", torch.float32), ("cpu", torch.bfloat16), (gpu, torch.float32),
                                            (gpu, torch.bfloat16))):
            comps = adapter.load(path, dtype=dtype)
            pipe = adapter.build_pipeline(comps, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
            if twin:
                torch.manual_seed(0)  # E2's first Linear is randomly initialised: the same in every row
                adapter.add_anystep(pipe.transformer)
                pipe.scheduler = TwinFlowScheduler(num_train_timesteps=1000, prediction_type="flow_matching", shift=1.0)
            pipe.to(device)
            emb = adapter.encode_prompts(comps, ["a red circle"])  # the text encoders on `device` in `dtype`
            emb_ref = emb if ref is None else emb_ref
            emb_note = "; ".join(f"{k} {'ref' if ref is None else f'{rel(v, emb_ref[k]):.4f}'} "
                                 f"({bool(torch.isfinite(v).all())})" for k, v in emb.items() if torch.is_tensor(v))
            kwargs = adapter.pipeline_prompt_kwargs(emb, guidance=None)
            kwargs.setdefault("guidance_scale", 0.0)
            gen = torch.Generator().manual_seed(0)  # fp32 CPU start noise (see FlowModelAdapter.start_noise)
            start = adapter.pipeline_latent_kwargs(comps, adapter.start_noise(comps, 1, 32, 32, gen).to(dtype))
            ctx = anystep.anystep_state(pipe.transformer, tt=0.0, sign=1.0) if twin else _null()
            with ctx, ModuleOutputs(pipe.transformer) as outputs:
                img = pipe(**kwargs, num_inference_steps=1, generator=gen, output_type="pt",
                           **start).images[0].float().cpu()
            if ref is None:
                ref, ref_outputs = img, outputs
            name = "TwinFlow (any-step, zero-init)" if twin else "stock FLUX, Euler"
            rows.append(f"| {name} | {device} | {str(dtype).split('.')[-1]} | "
                        f"{'ref' if img is ref else f'{rel(img, ref):.4f}'} | {bool(torch.isfinite(img).all())} | "
                        f"{emb_note} | {'ref' if img is ref else outputs.first_divergence(ref_outputs)} |")
            print(rows[-1], flush=True)
    return rows


# bf16 against fp32 stays near 0.02 at the output of these tiny models, but a sinusoidal time embedding of a bf16
# timestep can be 0.25 away (its high frequencies turn the rounding of t into phase): 0.5 is a bug, not rounding
DIVERGED = 0.5


class ModuleOutputs:
    """Every transformer module's first output of the sampling call (fp64 on the CPU), in call order, so two runs
    of the same inputs on other devices / dtypes can be compared module by module."""

    def __init__(self, model):
        self.model, self.outputs, self.handles = model, {}, []

    def __enter__(self):
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_hook(
                lambda m, args, out, name=name or "(model)": self._keep(name, out)))
        return self

    def _keep(self, name, out):
        import torch

        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        if torch.is_tensor(out) and out.is_floating_point() and name not in self.outputs:
            self.outputs[name] = out.detach().double().cpu()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def first_divergence(self, ref: "ModuleOutputs") -> str:
        """'first module over DIVERGED (rel) · largest: module (rel) · output rel' against the reference run."""
        dist = {name: rel(out, ref.outputs[name]) for name, out in self.outputs.items()
                if name in ref.outputs and out.shape == ref.outputs[name].shape}
        first = next((f"{n} ({r:.3f})" for n, r in dist.items() if not r <= DIVERGED), "none")  # NaN: diverged
        worst = max(dist, key=lambda n: dist[n] if dist[n] == dist[n] else float("inf"), default=None)
        largest = f"{worst} ({dist[worst]:.3f})" if worst else "-"
        return f"{first} · largest: {largest} · output {dist.get('(model)', float('nan')):.3f}"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def variant_config(cfg: dict, change: dict) -> dict:
    """`cfg` with a variant's config keys (not its deepspeed_config, _env or _sdpa); turning TwinFlow off drops
    TwinFlow's other options, which a run without TwinFlow refuses."""
    cfg = {**cfg, **{k: v for k, v in change.items() if k not in ("deepspeed_config", "_env", "_sdpa")}}
    if cfg.get("twinflow_enabled") is False:
        cfg = {k: v for k, v in cfg.items() if not k.startswith("twinflow_") or k == "twinflow_enabled"}
    return cfg


def run_trainer(cfg: dict, change: dict, tmp: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """launcher/train.py on `cfg` with one suspect `change` applied: config keys, a `deepspeed_config` dict,
    `_env` (environment) or `_sdpa` (torch.backends.cuda switches set before the trainer starts)."""
    cfg = variant_config(cfg, change)
    if change.get("deepspeed_config") is not None:
        cfg["deepspeed_config"] = os.path.join(tmp, "ds.json")
        with open(cfg["deepspeed_config"], "w") as fh:
            json.dump(change["deepspeed_config"], fh)
    path = os.path.join(tmp, "config.json")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    cmd = [sys.executable, "launcher/train.py", "--config", path]
    switches = "".join(f"torch.backends.cuda.{k}({v}); " for k, v in change.get("_sdpa", {}).items())
    if switches:  # the trainer as its own __main__, after the switches
        cmd = [sys.executable, "-c", f"import runpy, sys, torch; {switches}sys.argv = {cmd[1:]!r}; "
               "runpy.run_path('launcher/train.py', run_name='__main__')"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **change.get("_env", {})})


def part_b(out: str, variants: int, deadline: float, report) -> list[str]:
    """Writes out/fix.json: the first GPU variant that trained all 3 steps, when the GPU check's own config did not
    (the GPU check's train step then trains with it, so that sampling still gets a LoRA to measure). When the GPU
    check's own config trains there is nothing to bisect: it stops after that row. A variant that could not finish
    by `deadline` (time.time()) is not started. `report(rows)` is called after every row (the table so far)."""
    rows = ["| variant | exit | steps logged | first non-finite report | cached latents / embeddings finite | s |",
            "|---|---:|---:|---|---|---:|"]
    base_trained, longest = None, 0.0
    for name, change in VARIANTS[:variants]:
        if base_trained or time.time() + max(longest, 20.0) > deadline:
            why = "not needed: the GPU check's config trains" if base_trained else "not run: no time left"
            rows.append(f"| {name} | - | - | {why} | - | - |")
            continue
        cfg = {**BASE_CONFIG, "output_dir": os.path.join(out, re.sub(r"\W+", "_", name))}
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            proc = run_trainer(cfg, change, tmp)
        text = proc.stdout + proc.stderr
        bad = re.findall(r"fewstep: step \d+: (non-finite[^\n]*|gradient norm[^\n]*)", text)
        applied = _applied_steps(cfg["output_dir"])
        first = bad[0] if bad else ("" if proc.returncode == 0 else text.strip().splitlines()[-1][:160])
        longest = max(longest, time.time() - t0)
        rows.append(f"| {name} | {proc.returncode} | {applied} | {first} | {_cache_finite(cfg['output_dir'])} | "
                    f"{time.time() - t0:.0f} |")
        print(rows[-1], flush=True)
        report(rows)
        trained = proc.returncode == 0 and applied == str(BASE_CONFIG["max_train_steps"])
        if base_trained is None:
            base_trained = trained
        elif (not base_trained and trained and "CUDA_VISIBLE_DEVICES" not in change.get("_env", {})
              and not os.path.exists(os.path.join(out, "fix.json"))):
            with open(os.path.join(out, "fix.json"), "w") as fh:
                json.dump({"name": name, "change": change}, fh)
    return rows


def _cache_finite(output_dir: str) -> str:
    """Whether every cached latent and prompt embedding the run wrote is finite, per kind (the cache fill runs the
    VAE and text encoders on the GPU)."""
    import glob

    from safetensors.torch import load_file

    out = []
    for kind in ("latents", "text"):
        files = glob.glob(os.path.join(output_dir, "cache", "**", kind, "**", "*.safetensors"), recursive=True)
        bad = sum(1 for f in files if not all(bool(v.float().isfinite().all()) for v in load_file(f).values()))
        out.append(f"{kind}: {len(files) - bad}/{len(files)}")
    return ", ".join(out)


def _applied_steps(output_dir: str) -> str:
    path = os.path.join(output_dir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return "0"
    with open(path) as fh:
        return str(sum(1 for line in fh if line.strip()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "output", "cuda_diagnose"))
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--variants", type=int, default=len(VARIANTS), help="run the first N training variants")
    ap.add_argument("--train", metavar="CONFIG", help="instead: train CONFIG with --fix's change (GPU check)")
    ap.add_argument("--fix", metavar="FIX_JSON", help="a fix.json written by part B")
    ap.add_argument("--deadline-s", type=float, default=float("inf"),
                    help="seconds from now by which part B must end: variants that could not finish are not started")
    args = ap.parse_args(argv)
    if args.train:
        with open(args.train) as fh:
            cfg = json.load(fh)
        with open(args.fix) as fh:
            fix = json.load(fh)
        print(f"cuda_diagnose: training {args.train} with '{fix['name']}' ({fix['change']})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            proc = run_trainer(cfg, fix["change"], tmp, timeout=600)
        print(proc.stdout + proc.stderr)
        return proc.returncode
    deadline = time.time() + args.deadline_s
    os.makedirs(args.out, exist_ok=True)
    md = ["### CUDA diagnosis (`bench/cuda_diagnose.py`)", ""]

    def report(more: list[str]) -> None:  # rewritten as rows arrive: a run cut short keeps what it found
        with open(os.path.join(args.out, "diagnose.md"), "w") as fh:
            fh.write("\n".join(md + more))

    if "a" in args.parts:
        md += ["Part A: one 32 px image from the same CPU noise", "", randn_streams(), ""] + part_a() + [""]
        report([])
    if "b" in args.parts:
        md += ["Part B: 3 TwinFlow LoRA steps on tiny:flux (the GPU check's config), one change per row", ""]
        md += part_b(args.out, args.variants, deadline, report) + [""]
    report([])
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
