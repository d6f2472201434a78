#!/usr/bin/env python
"""TwinFlow training for every NFE (#16 part 2): which batch-group shares and budget drive 1-, 2- and 4-step quality.

Each variant is the demo's TwinFlow recipe (recipes.TWINFLOW at the demo's budget: batch 32, 600 steps, LR 5e-4, the
demo teacher data/digits-teacher) with one change, or the same at the benchmark's budget (`4x`: batch 64 x 1200 steps,
as run.py trains; `8x`: 2400 steps) with one change. Runs are trained through `launcher/train.py` (two at a time),
optionally with several training seeds (`--seeds`, config 'seed'), then sampled with the default sampler
(`twinflow_preset(n)`) at 1, 2 and 4 NFE from `--noises` start-noise draws (1,000 samples each) and scored as the demo
scores (FD mean +- std over the draws). Every finished run under --out is scored; a variant with several seeds also
gets its seeds' mean. The teacher's 50-step row gives the targets: 1-NFE FD <= 1.2x (full fine-tune) and 1.3x (LoRA),
and FD(4) <= FD(2) <= FD(1).

    python bench/quality/twinflow_training.py [--out output/twinflow_training] [--only full-base lora-base ...]
                                               [--seeds 0 1 2] [--train-only]

Writes `<out>/twinflow_training.md` and `.json`.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from sampler_modes import _demo, draw_scorer  # noqa: E402
from train_runs import run_parallel  # noqa: E402

LORA = dict(lora_rank=32, lora_alpha=32)
BIG = dict(train_batch_size=64, max_train_steps=1200)
# name -> (full fine-tune?, overrides of the demo recipe, label)
VARIANTS = {
    "full-base": (True, {}, "demo recipe (equal group shares e2e:mul:any:adv = 1:1:1:1)"),
    "full-e2e2": (True, {"twinflow_group_weights": [2, 1, 1, 1]}, "group shares 2:1:1:1 (twice the e2e rows)"),
    "full-e2e3": (True, {"twinflow_group_weights": [3, 1, 1, 1]}, "group shares 3:1:1:1"),
    "full-adv2": (True, {"twinflow_group_weights": [1, 1, 1, 2]}, "group shares 1:1:1:2 (twice the adv rows)"),
    "full-any2": (True, {"twinflow_group_weights": [1, 1, 2, 1]}, "group shares 1:1:2:1 (twice the any rows)"),
    "full-steps2x": (True, {"max_train_steps": 1200}, "1200 steps (twice the budget)"),
    "lora-base": (False, LORA, "LoRA r32, demo recipe"),
    "lora-e2e2": (False, {**LORA, "twinflow_group_weights": [2, 1, 1, 1]}, "LoRA r32, group shares 2:1:1:1"),
    "lora-steps2x": (False, {**LORA, "max_train_steps": 1200}, "LoRA r32, 1200 steps"),
    # the benchmark's budget (run.py: batch 64 x 1200 steps, 4x the demo's), at the demo's LR
    "full-4x": (True, BIG, "4x budget (batch 64 x 1200 steps)"),
    "full-4x-e2e2": (True, {**BIG, "twinflow_group_weights": [2, 1, 1, 1]}, "4x budget, group shares 2:1:1:1"),
    "full-4x-any2": (True, {**BIG, "twinflow_group_weights": [1, 1, 2, 1]}, "4x budget, group shares 1:1:2:1"),
    "full-4x-lr2e4": (True, {**BIG, "learning_rate": 2e-4}, "4x budget, LR 2e-4 (run.py's full fine-tune LR)"),
    "full-4x-rect2": (True, {**BIG, "twinflow_rectify_weight": 2.0}, "4x budget, twinflow_rectify_weight 2"),
    "full-4x-lr2e4-e2e2": (True, {**BIG, "learning_rate": 2e-4, "twinflow_group_weights": [2, 1, 1, 1]},
                           "4x budget, LR 2e-4, group shares 2:1:1:1"),
    "full-4x-lr1e4": (True, {**BIG, "learning_rate": 1e-4}, "4x budget, LR 1e-4"),
    "full-8x": (True, {**BIG, "max_train_steps": 2400}, "8x budget (batch 64 x 2400 steps)"),
    "full-8x-lr2e4": (True, {**BIG, "max_train_steps": 2400, "learning_rate": 2e-4}, "8x budget, LR 2e-4"),
    "lora-4x": (False, {**LORA, **BIG}, "LoRA r32, 4x budget"),
    "lora-4x-e2e2": (False, {**LORA, **BIG, "twinflow_group_weights": [2, 1, 1, 1]},
                     "LoRA r32, 4x budget, group shares 2:1:1:1"),
    "lora-8x": (False, {**LORA, **BIG, "max_train_steps": 2400}, "LoRA r32, 8x budget"),
}
NFES = (1, 2, 4)


def run_name(variant: str, seed: int) -> str:
    """The run folder under --out: the variant's name, with `.seed<k>` for training seeds other than 0."""
    return variant if seed == 0 else f"{variant}.seed{seed}"


def finished_runs(out: str) -> list[tuple[str, int]]:
    """(variant, training seed) of every finished run under `out`, in VARIANTS order, then by seed."""
    import recipes

    found = []
    for variant in VARIANTS:
        seeds = [0] + sorted(int(d.rsplit(".seed", 1)[1]) for d in os.listdir(out)
                             if d.startswith(variant + ".seed") and d.rsplit(".seed", 1)[1].isdigit())
        found += [(variant, k) for k in seeds if recipes.finished(os.path.join(out, run_name(variant, k)))]
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "output", "twinflow_training"))
    ap.add_argument("--teacher", default=os.path.join(REPO, "data", "digits-teacher"))
    ap.add_argument("--only", nargs="+", default=None, choices=sorted(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (config 'seed') per variant")
    ap.add_argument("--noises", type=int, default=3)
    ap.add_argument("--train-only", action="store_true", help="train the missing runs; score and report nothing")
    args = ap.parse_args(argv)
    demo = _demo()
    import recipes
    import samplers
    from fewstep.sampling import flow_sigmas

    demo.quiet()
    t0 = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    runs = [(v, k) for v in (args.only or list(VARIANTS)) for k in args.seeds]
    _, score = draw_scorer(demo, args.teacher, out, args.noises)  # also writes the training data under <out>/data
    todo = []
    for variant, seed in runs:
        full, over, _ = VARIANTS[variant]
        name = run_name(variant, seed)
        cfg = recipes.twinflow_config(os.path.join(out, name), args.teacher, os.path.join(out, "data", "train.json"),
                                      os.path.join(out, "cache"), full=full,
                                      **{**demo.DEMO["twinflow"], **over, "seed": seed})
        with open(os.path.join(out, f"{name}.config.json"), "w") as fh:
            json.dump(cfg, fh, indent=1)
        if not recipes.finished(cfg["output_dir"]):
            todo.append(name)
    times_path = os.path.join(out, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for pair in (todo[i:i + 2] for i in range(0, len(todo), 2)):  # two trainings at a time (2 cores)
        res = run_parallel({n: [sys.executable, os.path.join(REPO, "launcher", "train.py"), "--config",
                                os.path.join(out, f"{n}.config.json")] for n in pair},
                           {n: os.path.join(out, f"{n}.log") for n in pair}, cwd=REPO, tag="twinflow_training")
        failed = [n for n, r in res.items() if r["returncode"]]
        if failed:
            raise SystemExit(f"training failed: {failed} (see {out}/<name>.log)")
        times.update({n: {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]} for n, r in res.items()})
        with open(times_path, "w") as fh:
            json.dump(times, fh, indent=1)

    if args.train_only:
        return 0
    # every finished run under --out is scored (sampling is cheap next to training), so the report is never partial
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    teacher = {"row": "teacher (Euler)", "nfe": 50,
               **score(lambda cond, k, z: samplers.euler(args.teacher, cond, z, flow_sigmas(50)))}
    print(f"[{time.time() - t0:5.0f} s] teacher @ 50: FD {teacher['fd_mean']:.2f}", flush=True)
    results = []
    for variant, seed in finished_runs(out):
        full, _, label = VARIANTS[variant]
        name = run_name(variant, seed)
        for n in NFES:
            r = score(lambda cond, k, z: samplers.twinflow(args.teacher, os.path.join(out, name), cond, z, n,
                                                           full=full, seed=k))
            results.append({"variant": variant, "seed": seed, "label": label, "full": full, "nfe": n, **r,
                            "cpu_s": times.get(name, {}).get("cpu_s")})
            print(f"[{time.time() - t0:5.0f} s] {name} @ {n}: FD {r['fd_mean']:.2f} +- {r['fd_std']:.2f}", flush=True)
    write_report(out, args.noises, teacher, results)
    return 0


def write_report(out: str, noises: int, teacher: dict, results: list[dict]) -> None:
    """One row per trained run; a variant trained with several seeds also gets a row of its seeds' means (the +- there
    is the spread over training seeds)."""
    t50 = teacher["fd_mean"]
    lines = [f"1,000 samples per draw, {noises} start-noise draws (FD mean +- std); sampler: `twinflow_preset(n)`. "
             f"Teacher, 50 Euler steps: FD {t50:.2f} +- {teacher['fd_std']:.2f}; targets 1-NFE FD <= "
             f"{1.2 * t50:.2f} (full, 1.2x) / {1.3 * t50:.2f} (LoRA, 1.3x).", "",
             "| variant | training seed | FD 1 NFE | FD 2 NFE | FD 4 NFE | 4 <= 2 <= 1 | 1 NFE / teacher-50 | "
             "training CPU |",
             "|---|---:|---:|---:|---:|:---:|---:|---:|"]
    by = {}
    for r in results:
        by.setdefault(r["variant"], {}).setdefault(r["seed"], {})[r["nfe"]] = r

    def row(label, seed, fd, std, cpu):
        ordered = fd[4] <= fd[2] <= fd[1]
        return (f"| {label} | {seed} | " + " | ".join(f"{fd[n]:.2f} +- {std[n]:.2f}" for n in NFES)
                + f" | {'yes' if ordered else 'no'} | {fd[1] / t50:.2f}x | " + (f"{cpu / 60:.1f} min |" if cpu else "- |"))

    for variant, seeds in by.items():
        for seed, rows in seeds.items():
            lines.append(row(rows[1]["label"], seed, {n: rows[n]["fd_mean"] for n in NFES},
                             {n: rows[n]["fd_std"] for n in NFES}, rows[1]["cpu_s"]))
        if len(seeds) > 1:
            means = {n: [s[n]["fd_mean"] for s in seeds.values()] for n in NFES}
            lines.append(row(f"**{next(iter(seeds.values()))[1]['label']}: mean over training seeds**",
                             f"{len(seeds)} seeds", {n: float(np.mean(means[n])) for n in NFES},
                             {n: float(np.std(means[n])) for n in NFES}, None))
    with open(os.path.join(out, "twinflow_training.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "twinflow_training.json"), "w") as fh:
        json.dump({"noises": noises, "teacher": teacher, "rows": results}, fh, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
