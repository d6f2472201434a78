"""Export the benchmark's teacher as a self-contained pipeline folder (the demo's shipped data/digits-teacher/).

`python bench/quality/run.py --stages prepare teacher --export-teacher DIR` trains the teacher (or reuses a finished
one in --out) and writes DIR with `FluxPipeline.save_pretrained` (real files, no symlinks; the transformer in bf16
by default, which fewstep loads back as fp32) plus a README.md that records how it was made, read back from the run's
own records (config, data split, timings, the commands).
"""
from __future__ import annotations

import json
import os

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


def _exported_to(command: str) -> str | None:
    words = command.split()
    return words[words.index("--export-teacher") + 1] if "--export-teacher" in words[:-1] else None


def export(out: str, dest: str, dtype: str, settings: dict, command: str) -> str:
    """Write <dest> from <out>/teacher_pipeline and the records under <out>; returns dest."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(os.path.join(out, "teacher_pipeline"),
                                        dtype={"transformer": DTYPES[dtype], "default": torch.float32})
    pipe.save_pretrained(dest, safe_serialization=True)
    records = {n: json.load(open(os.path.join(out, f"{n}.json")))
               for n in ("prepare", "times", "teacher.config", "invocations")
               if os.path.exists(os.path.join(out, f"{n}.json"))}
    prep, cfg = records.get("prepare", {}), records.get("teacher.config", {})
    t = records.get("times", {}).get("teacher", {})
    keys = ("method", "model_type", "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler",
            "lr_warmup_steps", "caption_dropout_probability", "mixed_precision", "zero_stage", "seed")
    runs = [f"  - {i['date']}: `{i['command']}` ({i['minutes']} min)" for i in records.get("invocations", [])
            if _exported_to(i["command"]) in (None, dest)]  # not the exports to other folders
    text = [
        "# digits-teacher: a small FLUX-architecture teacher for sklearn's digits",
        "",
        "The teacher `python launcher/demo.py` distils from (TwinFlow, Glance). A diffusers `FluxPipeline` folder "
        "written with `save_pretrained`: a FLUX.1-architecture `FluxTransformer2DModel` "
        f"({settings['model']}, {prep.get('transformer_params', 0) / 1e6:.2f} M parameters, stored in {dtype}; "
        "fewstep loads it as fp32), fewstep's tiny random CLIP and T5 text encoders (frozen) and an identity-like "
        "1-channel `AutoencoderKL` (encode = 2x2 average of the grey value, decode = nearest upsampling; "
        "`bench/quality/pixel_pipeline.py`) whose `shift_factor` "
        f"{prep.get('pixel_mean', float('nan')):.4f} and `scaling_factor` 1/{prep.get('pixel_std', float('nan')):.4f}"
        " standardise the training pixels. Prompts: \"a drawing of zero\" .. \"a drawing of nine\"; 16x16 pixels, "
        "8x8 latents.",
        "",
        "## How it was made",
        "",
        f"- Command: `{command}` (the method-quality benchmark's prepare and teacher stages, then this export).",
        "- Invocations recorded in its work folder (finished stages are skipped by later ones; exports to other "
        "folders left out):",
        *(runs or ["  - (none recorded)"]),
        f"- Data: sklearn's `load_digits`, stratified split with seed 0: {prep.get('train', '?')} training digits "
        f"(the teacher's data) and {prep.get('held_out', '?')} held out (the demo's and benchmark's reference set; "
        "never trained on). 8x8 upsampled 2x to 16x16.",
        "- Training: plain flow matching from random init through `launcher/train.py`: "
        + ", ".join(f"`{k}` {json.dumps(cfg[k])}" for k in keys if k in cfg)
        + ", logit-normal sigmas, AdamW.",
        f"- Time: {t.get('wall_s', 0) / 60:.1f} min wall, {t.get('cpu_s', 0) / 60:.1f} CPU-min on a 2-core CPU, one "
        "thread." if t else "- Time: not recorded.",
        f"- Size: {_size_mb(dest):.1f} MB in all.",
        "",
        "`python launcher/demo.py` measures it (FD and class accuracy against the held-out digits at 1 and 50 "
        "Euler steps) beside what is distilled from it; `bench/quality/RESULTS.md` has the benchmark's teacher rows "
        "(same recipe, 1000 samples, more step counts).",
        "",
    ]
    with open(os.path.join(dest, "README.md"), "w") as fh:
        fh.write("\n".join(text))
    return dest
