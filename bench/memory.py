#!/usr/bin/env python
"""Host memory per rank, stage by stage, of ZeRO-3 runs of a real-width Qwen-Image transformer, against the planner.

    python bench/memory.py --case lora --blocks 5     # TwinFlow LoRA, ZeRO-3, bf16: 1.74 B parameters
    python bench/memory.py --case full --blocks 1     # full fine-tune + EMA, ZeRO-3, bf16: load, steps, exports

The transformer has Qwen-Image's real width (hidden 3072, 24 heads of 128, MLP x4, 3584-wide text input) and
`--blocks` of its 60 blocks; it is saved with `save_pretrained` as sharded bf16 safetensors inside a pipeline folder
with a 3584-wide one-layer text encoder and a small VAE (16 latent channels). Training runs through
`launcher/train.py` under `torchrun --nproc_per_node 2` (gloo), so the trainer's own load, step and export paths
are measured. A monitor thread resets each rank's peak RSS (`/proc/PID/clear_refs`, needs root) at every stage
boundary the trainer logs and reads the peak (VmHWM) at the next: set-up + cache fill, load (model + engine),
train (steps), checkpoint (the last step's, written before the exports), export (validation + exports). The planner (`fewstep.planning`, CPU knobs) predicts
the same stages; the table shows both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
GiB = 2 ** 30
TEXT_TOKENS = 20  # the data's captions, encoded (the planner's text length for this run)
# (stage, the trainer's log line that ends it): the trainer saves its last checkpoint before it exports
STAGES = [("setup", "fewstep: loading "), ("load", "trainable params | world"), ("train", "saving checkpoint step-"),
          ("checkpoint", "checkpoint saved:"), ("export", ": exported to")]


def qwen_config(blocks: int, heads: int = 24) -> dict:
    """Qwen-Image's transformer config with `blocks` blocks (and `heads` heads of 128: 24 is the real width)."""
    with open(os.path.join(REPO, "configs", "models", "qwen_image.json")) as fh:
        cfg = json.load(fh)
    return {**{k: v for k, v in cfg.items() if k != "_source"}, "num_layers": blocks, "num_attention_heads": heads}


def planner_figures(result: dict) -> dict:
    """The planner's per-rank load / train / export peaks (GiB) for the measured run, on CPU knobs, with the measured
    set-up stage (imports, process group) as its fixed overhead."""
    from fewstep.config import load_config
    from fewstep.planning import GiB as G, knobs_for, plan_memory

    cfg = load_config(None, {**result["config"], "resolution": 64})
    overhead = max(result["peaks_gib"]["setup"])
    lay = plan_memory(cfg, 2, model_config=qwen_config(result["blocks"], result["heads"]), knobs=knobs_for(cfg, "cpu"),
                      overhead_gb=overhead, text_tokens=TEXT_TOKENS).configured
    return {"load": lay.load / G, "train": lay.total / G, "export": lay.export / G}


def build_pipeline(folder: str, blocks: int, heads: int = 24) -> None:
    """A QwenImagePipeline folder whose transformer is real-width (bf16, sharded) and everything else small."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from fewstep.models.tiny import vocabulary, word_tokenizer

    if os.path.exists(os.path.join(folder, "model_index.json")):
        return
    torch.manual_seed(0)
    n = len(vocabulary())
    text = dict(vocab_size=n + 4, hidden_size=3584, intermediate_size=256, num_hidden_layers=1,
                num_attention_heads=28, num_key_value_heads=4, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                max_position_embeddings=2048, pad_token_id=0)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=3584, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, fullatt_block_indexes=[0], window_size=28)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                  image_token_id=n + 1, video_token_id=n + 2))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never an fp32 copy of the big transformer
    try:
        transformer = QwenImageTransformer2DModel(**{k: v for k, v in qwen_config(blocks, heads).items()
                                                     if not k.startswith("_")})
    finally:
        torch.set_default_dtype(old)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, text_encoder=encoder,
                             tokenizer=word_tokenizer("qwen", 1024 + 34), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="1GB")


def rank_pids(parent: int) -> list[int]:
    """The worker processes torchrun started (its children), by rank order of PID."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == parent:
                        kids.append(int(d))
            except OSError:
                pass
    return sorted(kids)


def peak_and_reset(pid: int) -> float:
    """VmHWM (peak resident set) since the last reset, in bytes; then reset it."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            hwm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return float(hwm)
    except (OSError, StopIteration):
        return float("nan")


def measure(cmd: list[str], env: dict, log_path: str) -> dict[str, list[float]]:
    """Run the 2-rank training; return {stage: [peak RSS of rank 0, rank 1]}."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks, stage, pids = {}, 0, []
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(line)
            if not pids:
                pids = rank_pids(proc.pid)
            marker = STAGES[stage][1] if stage < len(STAGES) else None
            if marker and marker in line and len(pids) == 2:
                peaks[STAGES[stage][0]] = [peak_and_reset(p) for p in pids]
                stage += 1
    if proc.wait() != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}); see {log_path}")
    return peaks


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("lora", "full"), required=True)
    ap.add_argument("--blocks", type=int, required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--heads", type=int, default=24, help="attention heads of 128 (24: Qwen-Image's real width)")
    ap.add_argument("--out", default=os.path.join(REPO, "output", "bench-memory"))
    args = ap.parse_args(argv)
    from fewstep_testing import write_config, write_dataset

    tag = f"{args.blocks}" + ("" if args.heads == 24 else f"x{args.heads}h")
    work = os.path.join(args.out, f"{args.case}-{tag}")
    model = os.path.join(args.out, f"qwen-{tag}")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    build_pipeline(model, args.blocks, args.heads)
    print(f"memory: model folder ready ({time.time() - t0:.0f} s)", flush=True)
    backend = write_dataset(work, n=4, size=64)
    with open(backend) as fh:
        entries = json.load(fh)
    entries[0]["resolution"] = 64
    with open(backend, "w") as fh:
        json.dump(entries, fh)
    common = dict(model_family="qwen_image", pretrained_model_name_or_path=model, zero_stage=3,
                  mixed_precision="bf16", train_batch_size=1, max_train_steps=args.steps, checkpointing_steps=0,
                  validation_steps=0, validation_num_inference_steps=1, output_dir=os.path.join(work, "run"),
                  cache_dir=os.path.join(work, "cache"), gradient_checkpointing=True)
    if args.case == "lora":
        common.update(model_type="lora", lora_rank=16, twinflow_enabled=True, use_ema=True, ema_decay=0.99,
                      twinflow_adversarial_enabled=True)
    else:
        common.update(model_type="full", use_ema=True, ema_decay=0.99, learning_rate=1e-5)
    cfg_path = write_config(work, backend, **common)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    import shutil
    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
    t0 = time.time()
    peaks = measure(["torchrun", "--nproc_per_node", "2", "--standalone", "launcher/train.py",
                     "--config", cfg_path], env, os.path.join(work, "train.log"))
    wall = time.time() - t0
    with open(os.path.join(work, "train.log")) as fh:  # the allocator setting the trainer reported (host_memory)
        allocator = next((ln.split("host memory: ", 1)[1].strip() for ln in fh if "fewstep: host memory: " in ln), None)
    result = {"case": args.case, "blocks": args.blocks, "heads": args.heads, "steps": args.steps, "wall_s": wall,
              "allocator": allocator,
              "peaks_gib": {k: [v / GiB for v in vals] for k, vals in peaks.items()}, "config": common,
              "date": time.strftime("%Y-%m-%d"), "command": "python bench/memory.py " + " ".join(argv)}
    result["planner_gib"] = planner_figures(result)
    with open(os.path.join(work, "memory.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(table(result))
    return result


def table(result: dict) -> str:
    rows = ["| stage | rank 0 GiB | rank 1 GiB | planner GiB |", "|---|---:|---:|---:|"]
    for stage, peaks in result["peaks_gib"].items():
        plan = result.get("planner_gib", {}).get(stage)
        rows.append(f"| {stage} | {peaks[0]:.2f} | {peaks[1]:.2f} | {'' if plan is None else f'{plan:.2f}'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
