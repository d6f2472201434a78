"""PNG sample grids and the RESULTS.md table, from the JSON files the stages wrote under <out>."""
from __future__ import annotations

import glob
import json
import os
import platform

import numpy as np
from PIL import Image

ROW_ORDER = ["real-train", "teacher-1", "teacher-2", "teacher-4", "teacher-10", "teacher-50", "teacher-cfg1.5-50",
             "teacher-10-shift0.6", "teacher-10-shift1.5", "teacher-10-shift3.0", "teacher-glance-schedule-10", "twinflow-lora-1", "twinflow-lora-2", "twinflow-lora-4", "twinflow-full-1",
             "twinflow-full-2", "twinflow-full-4", "glance-10"]


def save_grid(images: np.ndarray, labels: np.ndarray, path: str, cols: int = 8, scale: int = 2) -> str:
    """A 10-row grid (row k: the first `cols` samples labelled k), pixels [-1, 1] -> grey PNG, upscaled `scale`x."""
    images = np.asarray(images, dtype=np.float32)
    h, w = images.shape[-2:]
    canvas = np.full((10 * (h + 1) - 1, cols * (w + 1) - 1), 128, dtype=np.uint8)
    for k in range(10):
        for j, i in enumerate(np.flatnonzero(labels == k)[:cols]):
            tile = np.clip(np.round((images[i] + 1.0) * 127.5), 0, 255).astype(np.uint8)
            canvas[k * (h + 1):k * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = tile
    img = Image.fromarray(canvas, mode="L")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path, optimize=True)
    return path


def load_rows(out: str) -> list[dict]:
    """Every evaluated row, in table order, with the training time of the model it samples from."""
    times_path = os.path.join(out, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    found = {}
    for path in glob.glob(os.path.join(out, "eval", "*.json")):
        with open(path) as fh:
            r = json.load(fh)
        found[r["row"]] = r
    rest = sorted(found.values(), key=lambda x: (x.get("train") or "", x["nfe"] or 0))  # by run, then NFE
    ordered = [found.pop(k) for k in ROW_ORDER if k in found]
    ordered += [x for x in rest if x["row"] in found]
    for r in ordered:
        t = times.get(r.get("train") or "", {})
        r["train_wall_s"], r["train_cpu_s"], r["train_steps"] = t.get("wall_s"), t.get("cpu_s"), t.get("steps")
    return ordered


def _fmt_time(wall, cpu, steps) -> str:
    if wall is None:
        return "-"
    return f"{wall / 60:.1f} min ({cpu / 60:.1f} CPU-min, {steps} steps)"


def table(rows: list[dict], grid_prefix: str = "") -> str:
    """The Markdown results table, one line per row, linking each row's PNG grid."""
    lines = ["| row | NFE | FD (lower is better) | accuracy | diversity | training time (wall, CPU) | samples |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        grid = f"[png]({grid_prefix}{r['row']}.png)" if r["row"] != "real-train" else f"[png]({grid_prefix}real.png)"
        lines.append(f"| {r['method']} | {r['nfe'] if r['nfe'] is not None else '-'} | {r['fd']:.2f} | "
                     f"{100 * r['accuracy']:.1f}% | {r['diversity']:.3f} | "
                     f"{_fmt_time(r['train_wall_s'], r['train_cpu_s'], r['train_steps'])} | {grid} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked against the measured rows (only those whose rows exist)."""
    by = {r["row"]: r for r in rows}
    out = []
    t50, t1, t10 = by.get("teacher-50"), by.get("teacher-1"), by.get("teacher-10")
    for kind in ("lora", "full"):
        tf = by.get(f"twinflow-{kind}-1")
        if tf and t50:
            ok_fd = tf["fd"] <= 1.2 * t50["fd"]
            ok_acc = tf["accuracy"] >= t50["accuracy"] - 0.02
            diff = 100 * (tf["accuracy"] - t50["accuracy"])
            out.append(f"- TwinFlow {kind} at 1 NFE: FD {tf['fd']:.2f} vs 1.2 x teacher-50 = {1.2 * t50['fd']:.2f} "
                       f"-> **{'met' if ok_fd else 'missed'}**; accuracy {100 * tf['accuracy']:.1f}% vs teacher-50 "
                       f"{100 * t50['accuracy']:.1f}% ({diff:+.1f} points; read as no more than 2 points below) -> "
                       f"**{'met' if ok_acc else 'missed'}**")
    if t1 and t50:
        out.append(f"- Teacher at 1 NFE far worse than at 50: FD {t1['fd']:.2f} vs {t50['fd']:.2f} -> "
                   f"**{'met' if t1['fd'] > 2 * t50['fd'] else 'missed'}** (taken as > 2x)")
    g = by.get("glance-10")
    if g and t10:
        out.append(f"- Glance at 10 NFE beats the teacher's plain 10 steps: FD {g['fd']:.2f} vs {t10['fd']:.2f} -> "
                   f"**{'met' if g['fd'] < t10['fd'] else 'missed'}**")
    return out


def _cfg(out: str, name: str) -> dict:
    path = os.path.join(out, f"{name}.config.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def setup_section(out: str, prep: dict, settings: dict) -> list[str]:
    """How every model was trained and sampled, read back from the configs the run wrote."""
    t, tl, tf, g = (_cfg(out, n) for n in ("teacher", "twinflow_lora", "twinflow_full", "glance"))

    def opt(c, *keys):
        return ", ".join(f"`{k}` {json.dumps(c[k])}" for k in keys if k in c)

    common = ("method", "model_type", "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler",
              "lr_warmup_steps", "caption_dropout_probability")
    glance_keys = ("method", "max_train_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "lora_rank",
                   "lora_alpha")
    twin = ("use_ema", "ema_decay", "twinflow_adversarial_enabled", "twinflow_estimate_order",
            "twinflow_enhanced_ratio", "twinflow_delta_t", "twinflow_target_clamp")
    return [
        "## Set-up",
        "",
        "- **Latent path: an identity-like VAE.** The pipeline's `AutoencoderKL` (2 levels, 1 latent channel) has "
        "weights set so that encoding is a 2x2 average of the grey value and decoding nearest upsampling "
        "(`bench/quality/pixel_pipeline.py` explains how GroupNorm and SiLU are made exact). The 16x16 images are "
        "8x8 digits upsampled 2x, so the round trip is lossless (error ~1e-5) and the latents are the 8x8 digits, "
        f"standardised by the VAE's `shift_factor` {prep.get('pixel_mean', 0):.3f} and `scaling_factor` "
        f"1/{prep.get('pixel_std', 1):.3f}. Quality is measured on the decoded 16x16 pixels.",
        "- **Pipeline**: a diffusers `FluxPipeline` folder written with `save_pretrained`: that VAE, fewstep's tiny "
        "(random, frozen) CLIP and T5 text encoders (T5 budget 8 tokens), and a FLUX.1-architecture "
        f"`FluxTransformer2DModel` ({settings['model']}, {prep.get('transformer_params', 0) / 1e6:.2f} M parameters, "
        "no guidance embedding). Captions are \"a drawing of <zero..nine>\"; every digit word is its own token.",
        f"- **Teacher**: plain flow matching from random init, full fine-tuning: {opt(t, *common)}, "
        "logit-normal sigmas, fp32, ZeRO-2, AdamW. Caption dropout gives the empty prompt a meaning (TwinFlow's CFG "
        "target uses it). Sampled with diffusers' Euler on linspace(1, 1/N, N) (shift 1).",
        f"- **TwinFlow LoRA**: from the teacher pipeline, {opt(tl, *common, 'lora_rank', 'lora_alpha')}, LoRA on "
        f"{', '.join(tl.get('lora_targets') or [])}; any-step (tt, sign) embeddings trained in full. "
        f"{opt(tl, *twin)}.",
        f"- **TwinFlow full**: {opt(tf, *common)}; same TwinFlow options. Both sampled with `TwinFlowScheduler` "
        "defaults (UCGM, stochastic ratio 1, end gaps 0.6 / 0.5 for 1-2 / 4 steps), tt = 0, sign +1, exactly as "
        "`launcher/sample.py`.",
        f"- **Glance**: ONE training image (a \"three\", training index {prep.get('glance_image_index', '?')}), "
        f"{opt(g, *glance_keys)} (per phase), batch 1, default LoRA targets; "
        f"Slow sigmas {[round(s, 4) for s in g.get('glance_slow_timesteps', [])]}, "
        f"Fast {[round(s, 4) for s in g.get('glance_fast_timesteps', [])]} (steps 1,3,5,7,9 and 11,21,31,41,50 of the "
        "teacher's 50-step grid). Sampled in one pipeline with `fewstep.sampling.glance_pipeline_sample`.",
        "- **Classifier** (`bench/quality/features.py`): 3 conv layers + a 64-unit ReLU feature layer + 10 logits, "
        "Adam with +-1 pixel shifts, trained on the training split only. FD, accuracy and diversity use its "
        "64-d features; the held-out split is the reference set.",
        "",
    ]


def write_results(out: str, results_dir: str, *, smoke: bool, settings: dict) -> str:
    """Write RESULTS.md (the measured table, targets, set-up) into `results_dir`; the prose findings section is kept
    from an existing RESULTS.md (text between the FINDINGS markers), since it is written by a person."""
    rows = load_rows(out)
    prep = json.load(open(os.path.join(out, "prepare.json"))) if os.path.exists(os.path.join(out, "prepare.json")) \
        else {}
    path = os.path.join(results_dir, "RESULTS.md")
    findings = "_(no findings written yet)_"
    if os.path.exists(path):
        text = open(path).read()
        if "<!-- FINDINGS -->" in text and "<!-- /FINDINGS -->" in text:
            findings = text.split("<!-- FINDINGS -->")[1].split("<!-- /FINDINGS -->")[0].strip()
    inv_path = os.path.join(out, "invocations.json")
    invocations = json.load(open(inv_path)) if os.path.exists(inv_path) else []
    runs = [f"  - {i['date']}: `{i['command']}` ({i['minutes']} min)" for i in invocations] or ["  - (none recorded)"]
    md = [
        "# Method quality on real data (sklearn digits)" + (" - SMOKE RUN, NOT A RESULT" if smoke else ""),
        "",
        f"- Machine: {os.cpu_count()}-core CPU ({platform.machine()}), no GPU, shared with other jobs; one thread per "
        "process. Wall-clock times are therefore noisy; CPU time is the steadier measure. Runs are deterministic "
        "(fixed seeds, one thread): a repeated run reproduced every loss and metric exactly.",
        "- Commands (date, wall time; finished stages and rows are skipped by later invocations):",
        *runs,
        f"- Data: {prep.get('train', '?')} training / {prep.get('held_out', '?')} held-out digits (stratified, seed 0),"
        " 8x8 upsampled to 16x16. Generated: "
        f"{settings['samples']} samples per row ({settings['samples'] // 10} per class), the same start noise for "
        "every row.",
        f"- Classifier (feature space of FD, accuracy and diversity): held-out accuracy "
        f"{100 * prep.get('classifier_held_out_accuracy', float('nan')):.1f}%.",
        "",
        *setup_section(out, prep, settings),
        "## Results",
        "",
        table([r for r in rows if not r["method"].startswith("ablation")]),
        "",
        "FD: Frechet distance to the held-out split in the classifier's 64-d feature space (the `real training "
        "images` row is the floor: real data vs real data at the same sample count). Accuracy: share of samples "
        "prompted with digit k that the classifier labels k. Diversity: within-class mean pairwise feature distance "
        "relative to the held-out data's (1 = as diverse as real data). Training time: the run that produced the "
        "row's model (distillation rows build on the teacher's run).",
        "",
        *(["### Ablations (trained beside the main runs, same settings but the one change named)", "",
            table([r for r in rows if r["method"].startswith("ablation")]), ""]
          if any(r["method"].startswith("ablation") for r in rows) else []),
        "## Targets",
        "",
        *(targets(rows) or ["- (no rows yet)"]),
        "",
        "## Findings",
        "",
        "<!-- FINDINGS -->",
        findings,
        "<!-- /FINDINGS -->",
        "",
    ]
    os.makedirs(results_dir, exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(md))
    return path
