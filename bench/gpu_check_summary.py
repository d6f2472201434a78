#!/usr/bin/env python
"""Collect what `bench/gpu_check.sh` left in its work folder into `OUT/summary.md` (bench/RESULTS.md form) and
`OUT/gpu_check.json` (every figure, machine-readable). Run by the script after each step, so a run cut short still
leaves a summary of the steps it finished. Standard library only (no torch import: it runs in a fraction of a second).

    python bench/gpu_check_summary.py --work WORK --out OUT --mode gpu --command "bench/gpu_check.sh"
"""
import argparse
import json
import os
import re
import statistics

STEP_TITLES = {
    "setup": "install and environment",
    "diagnose": "CUDA diagnosis (bench/cuda_diagnose.py)",
    "kernel_tests": "kernel parity tests (pytest tests/kernels)",
    "kernels": "kernel benchmark (bench/kernels.py)",
    "train_step": "training step, Qwen-Image at real width (bench/train_step.py)",
    "train": "20-step TwinFlow LoRA through launcher/train.py",
    "sample": "launcher/sample.py at 1 and 2 NFE, with and without offload",
    "sample_tests": "sampling test on CUDA (tests/test_sample_cli.py)",
}


def _read(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _json(path):
    text = _read(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _fmt(v, digits=4):
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "-" if v is None else str(v)


def steps_table(work):
    """(rows, markdown) from WORK/steps.tsv: name, status, seconds, budget, command."""
    rows = []
    for line in (_read(os.path.join(work, "steps.tsv")) or "").splitlines():
        name, status, seconds, budget, command = (line.split("\t") + [""] * 5)[:5]
        rows.append({"step": name, "status": status, "seconds": int(seconds or 0), "budget_s": int(budget or 0),
                     "command": command})
    md = ["| step | what | status | s | budget s |", "|---|---|---|---:|---:|"]
    md += [f"| {r['step']} | {STEP_TITLES.get(r['step'], '')} | {r['status']} | {r['seconds']} | {r['budget_s']} |"
           for r in rows]
    return rows, "\n".join(md)


def pytest_outcome(log):
    """The last pytest summary line ('12 passed, 1 skipped in 3.2s'), or None."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|tests? collected|deselected).*?)\s*=*$",
                       log or "", re.M)
    return found[-1] if found else None


def train_figures(work):
    """launcher/train.py's metrics.jsonl: steps, median s/step after the first step, final loss, peak memory."""
    text = _read(os.path.join(work, "train", "logs", "metrics.jsonl"))
    if not text:
        return None
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    cfg = _json(os.path.join(work, "train_config.json")) or {}
    batch = cfg.get("train_batch_size", 1) * cfg.get("gradient_accumulation_steps", 1)
    timed = lines[1:] or lines
    return {"steps": len(lines), "s_per_step_median": statistics.median(batch / m["samples_per_s"] for m in timed),
            "loss_first": lines[0].get("loss"), "loss_last": lines[-1].get("loss"),
            "peak_mem_gb": max(m.get("peak_mem_gb", 0.0) for m in lines),
            "model": cfg.get("pretrained_model_name_or_path"), "mixed_precision": cfg.get("mixed_precision"),
            "batch": batch}


def sample_rows(work):
    rows = []
    for name in ("sample.json", "sample_offload_model.json", "sample_offload_sequential.json"):
        rec = _json(os.path.join(work, name))
        for r in (rec or {}).get("runs", []):
            rows.append({"file": name, "device": rec["device"], "dtype": rec["dtype"], "offload": rec["offload"],
                         "nfe": r["steps"], "s_per_image": r["seconds"], "load_s": rec["load_s"],
                         "peak_mem_gib": rec.get("peak_mem_gib")})
    return rows


def build(work, mode, command):
    env = _json(os.path.join(work, "env.json")) or {}
    rows, steps_md = steps_table(work)
    kernels_md = (_read(os.path.join(work, "kernels.md")) or "").strip()
    runs = ("train_step", "train_step_flow", "train_step_used_rows", "train_step_all_rows")
    ts = {k: _json(os.path.join(work, f"{k}.json")) for k in runs}
    train = train_figures(work)
    samples = sample_rows(work)
    tests = {k: pytest_outcome(_read(os.path.join(work, f"{k}.log"))) for k in ("kernel_tests", "sample_tests")}
    data = {"mode": mode, "command": command, "env": env, "steps": rows, "tests": tests, "train_step": ts,
            "train": train, "sample": samples, "kernels_md": kernels_md,
            "diagnose_md": _read(os.path.join(work, "diagnose.md"))}

    dry = mode == "dry"
    md = [f"## GPU check (`bench/gpu_check.sh`){' — DRY RUN on CPU' if dry else ''}", ""]
    if dry:
        md += ["**Dry run: every step at tiny sizes (smoke flags, collect-only tests) on the CPU, to prove that the "
               "script starts and that every command line is valid. None of these numbers is a figure.**", ""]
    md += [f"- Device: {env.get('device', '?')}" + (f", driver {env['driver']}" if env.get("driver") else ""),
           f"- Date: {env.get('date', '?')}; commit {env.get('commit', '?')}",
           f"- Command: `{command}`",
           "- Software: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()), "",
           steps_md, ""]
    md += [(_read(os.path.join(work, "diagnose.md")) or "### CUDA diagnosis\n\nno result").strip(), ""]
    md += ["### Kernel parity tests on CUDA", "", f"`pytest tests/kernels`: {tests['kernel_tests'] or 'no result'}", ""]
    md += ["### Kernels (`bench/kernels.py`)", "", kernels_md or "no result", ""]
    md += ["### Training step (`bench/train_step.py`)", ""]
    keys = ("device", "family", "blocks", "resolution", "batch", "method", "teacher_rows", "lora_rank", "params_base",
            "params_trainable", "s_per_step", "s_per_step_per_block", "samples_per_s", "tflop_per_step",
            "achieved_tflops", "peak_bf16_tflops_measured", "mfu", "peak_mem_gib", "non_model_share",
            "finite_losses_and_grad_norm")
    have = [k for k in runs if ts[k]]
    if have:
        names = [f"{ts[k]['method']} {ts[k]['resolution']}px b{ts[k]['batch']}" +
                 (f" ({ts[k].get('teacher_rows')} rows)" if ts[k]["method"] == "twinflow" else "") for k in have]
        md += ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(have)]
        md += [f"| {k} | " + " | ".join(_fmt(ts[h].get(k)) for h in have) + " |" for k in keys]
    else:
        md.append("no result")
    md += ["", "### TwinFlow LoRA through `launcher/train.py`", ""]
    if train:
        md += ["| model | precision | batch | steps | median s/step (after step 1) | loss first → last | peak GiB |",
               "|---|---|---:|---:|---:|---|---:|",
               f"| {train['model']} | {train['mixed_precision']} | {train['batch']} | {train['steps']} | "
               f"{_fmt(train['s_per_step_median'])} | {_fmt(train['loss_first'])} → {_fmt(train['loss_last'])} | "
               f"{_fmt(train['peak_mem_gb'])} |"]
    else:
        md.append("no result")
    md += ["", "### Sampling (`launcher/sample.py`, the TwinFlow LoRA above)", ""]
    if samples:
        md += ["| device | dtype | offload | NFE | s/image | load s | peak GiB |", "|---|---|---|---:|---:|---:|---:|"]
        md += [f"| {r['device']} | {r['dtype']} | {r['offload']} | {r['nfe']} | {_fmt(r['s_per_image'])} | "
               f"{_fmt(r['load_s'])} | {_fmt(r['peak_mem_gib'])} |" for r in samples]
    else:
        md.append("no result")
    md += ["", f"`pytest tests/test_sample_cli.py` (CUDA test): {tests['sample_tests'] or 'no result'}", ""]
    return data, "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("gpu", "dry"), required=True)
    ap.add_argument("--command", default="bench/gpu_check.sh")
    args = ap.parse_args(argv)
    data, md = build(args.work, args.mode, args.command)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
