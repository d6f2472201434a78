#!/usr/bin/env python
"""Method-quality benchmark on real data (sklearn digits): teacher vs TwinFlow (LoRA, full) vs Glance.

    python bench/quality/run.py                   # the full benchmark (tens of minutes on 2 CPU cores)
    python bench/quality/run.py --smoke --out D   # tiny sizes, a minute or two: proves the pipeline runs
    python bench/quality/run.py --stages eval report   # re-run some stages (finished ones are skipped unless --force)
    python bench/quality/run.py --ablations glance_lr1e4   # the main runs and only the ablations named
    python bench/quality/run.py --stages prepare teacher --export-teacher data/digits-teacher   # the demo's teacher

Stages: prepare (data split, dataset, pipeline, classifier, prompt embeddings) -> teacher (plain flow matching, full
fine-tuning from random init) -> distil (TwinFlow LoRA, TwinFlow full, Glance and the ABLATIONS variants, in
parallel) -> eval (one row at a time, each written to <out>/eval/<row>.json at once) -> report (RESULTS.md + PNG
grids). Every training run is
`launcher/train.py --config <json>` in a subprocess; every sample comes from a stock FluxPipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import quality_env  # noqa: E402,F401  (process defaults, before torch)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import digits  # noqa: E402
import features  # noqa: E402
import quality_report as report  # noqa: E402
import recipes  # noqa: E402
from recipes import glance_lists  # noqa: E402,F401  (the tests read it from here)
from train_runs import run_parallel  # noqa: E402

STAGES = ("prepare", "teacher", "distil", "eval", "report")
# Variants trained beside the main runs (--ablations picks some, --no-ablations none): name -> (base run, config
# overrides, label).
# A value "@uniform-slow"/"@uniform-fast" is replaced by the Glance lists at steps 1,6,..,46 of the 50-step grid.
ABLATIONS = {
    "twinflow_full_cfg": ("twinflow_full", {"twinflow_enhanced_ratio": 0.5},
                          "CFG-enhanced target, twinflow_enhanced_ratio 0.5 (the seed's default)"),
    "twinflow_full_noadv": ("twinflow_full", {"twinflow_adversarial_enabled": False}, "no L_adv / L_rectify"),
    "twinflow_full_frozen": ("twinflow_full", {"ema_decay": 1.0, "twinflow_enhanced_ratio": 1.0},
                             "frozen teacher (ema_decay 1), twinflow_enhanced_ratio 1 (target: its conditional v)"),
    "glance_10img": ("glance", {"data_backend_config": "data/ten.json"}, "10 training images (one per class)"),
    "glance_lr1e4": ("glance", {"learning_rate": 1e-4}, "learning_rate 0.0001 (a 5x lighter LoRA)"),
    "glance_uniform": ("glance", {"glance_slow_timesteps": "@uniform-slow", "glance_fast_timesteps": "@uniform-fast",
                                  "learning_rate": 1e-4},
                       "the teacher's plain 10-step sigmas as lists (steps 1,6,..,46), learning_rate 0.0001"),
}
UNIFORM_SLOW_STEPS, UNIFORM_FAST_STEPS = (1, 6, 11, 16, 21), (26, 31, 36, 41, 46)  # = flow_sigmas(10)
TEACHER_SHIFTS = (0.6, 1.5, 3.0)  # extra teacher rows: 10 Euler steps on shifted grids (is uniform its best?)

FULL = dict(
    limit=None, classifier_epochs=30, samples=1000, grid_cols=8,
    model=dict(width=128, heads=4, double_layers=2, single_layers=2),
    teacher=dict(train_batch_size=64, max_train_steps=3000, learning_rate=1e-3, lr_scheduler="cosine",
                 lr_warmup_steps=100),
    twinflow_lora=dict(train_batch_size=64, max_train_steps=1200, learning_rate=5e-4, lora_rank=32, lora_alpha=32),
    twinflow_full=dict(train_batch_size=64, max_train_steps=1200, learning_rate=2e-4),
    glance=dict(max_train_steps=60, learning_rate=5e-4, lora_rank=16, lora_alpha=64, lr_warmup_steps=10),
)
SMOKE = dict(
    limit=60, classifier_epochs=2, samples=40, grid_cols=2,
    model=dict(width=32, heads=2, double_layers=1, single_layers=1),
    teacher=dict(train_batch_size=8, max_train_steps=3, learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=1),
    twinflow_lora=dict(train_batch_size=4, max_train_steps=2, learning_rate=1e-3, lora_rank=4, lora_alpha=4),
    twinflow_full=dict(train_batch_size=4, max_train_steps=2, learning_rate=2e-4),
    glance=dict(max_train_steps=2, learning_rate=5e-4, lora_rank=4, lora_alpha=16, lr_warmup_steps=1),
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "output", "quality"), help="work directory (runs, caches)")
    ap.add_argument("--results", default=None, help="where RESULTS.md and PNG grids go (default: bench/quality, "
                                                    "or <out>/results with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (no quality claims)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--ablations", nargs="*", default=None, metavar="NAME", choices=sorted(ABLATIONS),
                    help="distil: train only these ablations (default: all of them; none given: none)")
    ap.add_argument("--no-ablations", dest="ablations", action="store_const", const=[],
                    help="distil: train only the main TwinFlow/Glance runs (as --ablations with no name)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=BASE:key=value,...",
                    help="distil: an extra run, e.g. twinflow_lora_2400=twinflow_lora:max_train_steps=2400 "
                         "(recorded in <out>/variants.json; evaluated as an ablation row)")
    ap.add_argument("--force", action="store_true", help="redo finished stages/rows of the selected stages")
    ap.add_argument("--rows", nargs="+", default=None, help="eval: only rows whose name starts with one of these")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export-teacher", metavar="DIR", default=None,
                    help="after the stages: write the teacher as a self-contained pipeline folder DIR with a README.md "
                         "saying how it was made (the demo's data/digits-teacher)")
    ap.add_argument("--export-dtype", choices=("bf16", "fp32"), default="bf16", help="--export-teacher weights dtype")
    return ap.parse_args(argv)


def _json(path, obj=None):
    if obj is None:
        with open(path) as fh:
            return json.load(fh)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)
    return obj


# ----------------------------------------------------------------------------------------------------------------------
# prepare


def prepare(args, S, out):
    """Split and write the data, save the base pipeline, train the classifier, cache prompt embeddings."""
    import pixel_pipeline

    from fewstep.models import get_adapter

    train, held = digits.load_split(args.seed, limit=S["limit"])
    digits.write_dataset(train, os.path.join(out, "data", "train"), os.path.join(out, "data", "train.json"))
    # Glance's one training image: the first training "three"
    one = int(np.flatnonzero(train.labels == 3)[0])
    digits.write_dataset(train, os.path.join(out, "data", "one"), os.path.join(out, "data", "one.json"), [one])
    ten = [int(np.flatnonzero(train.labels == k)[0]) for k in range(10)]  # one per class, for an ablation
    digits.write_dataset(train, os.path.join(out, "data", "ten"), os.path.join(out, "data", "ten.json"), ten)
    mean, std = digits.pixel_stats(train)
    base = os.path.join(out, "base_pipeline")
    pixel_pipeline.save_pipeline(base, shift_factor=mean, scaling_factor=1.0 / std, resolution=digits.RESOLUTION,
                           seed=args.seed, **S["model"])
    adapter = get_adapter("flux")
    comps = adapter.load(base, with_denoiser=False)
    for tok in comps.tokenizers:
        digits.check_captions(tok)
    emb = adapter.encode_prompts(comps, [digits.caption(k) for k in range(10)] + [""])
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in emb.items()}, os.path.join(out, "prompts.safetensors"))
    t0 = time.time()
    net = features.train_classifier(train.images, train.labels, epochs=S["classifier_epochs"], seed=args.seed)
    torch.save(net.state_dict(), os.path.join(out, "classifier.pt"))
    _, pred = features.features_and_predictions(net, held.images)
    _json(os.path.join(out, "prepare.json"), {
        "train": int(len(train.labels)), "held_out": int(len(held.labels)), "glance_image_index": one,
        "pixel_mean": mean, "pixel_std": std, "classifier_held_out_accuracy": float((pred == held.labels).mean()),
        "classifier_train_s": time.time() - t0,
        "transformer_params": sum(p.numel() for p in pixel_pipeline.flux_transformer(**S["model"]).parameters())})


# ----------------------------------------------------------------------------------------------------------------------
# training runs (configs for launcher/train.py)


def teacher_config(S, out):
    return recipes.teacher_config(os.path.join(out, "teacher"), os.path.join(out, "base_pipeline"),
                                  os.path.join(out, "data", "train.json"), os.path.join(out, "cache"), **S["teacher"])


def distil_configs(S, out):
    """The main distillation runs, all from the teacher pipeline (recipes in recipes.py)."""
    teacher_pipe, cache = os.path.join(out, "teacher_pipeline"), os.path.join(out, "cache")
    train = os.path.join(out, "data", "train.json")
    return {
        "twinflow_lora": recipes.twinflow_config(os.path.join(out, "twinflow_lora"), teacher_pipe, train, cache,
                                                 full=False, **S["twinflow_lora"]),
        "twinflow_full": recipes.twinflow_config(os.path.join(out, "twinflow_full"), teacher_pipe, train, cache,
                                                 full=True, **S["twinflow_full"]),
        "glance": recipes.glance_config(os.path.join(out, "glance"), teacher_pipe,
                                        os.path.join(out, "data", "one.json"), cache, **S["glance"]),
    }


def parse_variant(spec: str) -> tuple[str, tuple]:
    """'name=base:key=value,key=value' -> (name, (base run, overrides, label)); values are JSON where they parse."""
    try:
        name, rest = spec.split("=", 1)
        base, _, kvs = rest.partition(":")
        over = {}
        for kv in filter(None, kvs.split(",")):
            k, v = kv.split("=", 1)
            try:
                over[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                over[k.strip()] = v
    except ValueError:
        raise SystemExit(f"--variant {spec!r}: expected NAME=BASE:key=value[,key=value...]") from None
    if base not in ("twinflow_lora", "twinflow_full", "glance") or not name.startswith(base.split("_")[0]):
        raise SystemExit(f"--variant {spec!r}: BASE must be twinflow_lora, twinflow_full or glance, and NAME start "
                         "with 'twinflow' or 'glance' accordingly")
    return name, (base, over, ", ".join(f"{k} {json.dumps(v)}" for k, v in over.items()))


def variants(out: str) -> dict:
    """ABLATIONS plus the --variant runs recorded in <out>/variants.json."""
    path = os.path.join(out, "variants.json")
    extra = {k: tuple(v) for k, v in _json(path).items()} if os.path.exists(path) else {}
    return {**ABLATIONS, **extra}


def ablation_configs(S, out, names=None):
    """The variants' configs (ABLATIONS and --variant runs; only `names` among ABLATIONS if given): each its base
    run's config with its overrides and its own output_dir."""
    base = distil_configs(S, out)
    configs = {}
    for name, (src, over, _) in variants(out).items():
        if names is not None and name in ABLATIONS and name not in names:
            continue
        uniform = dict(zip(("@uniform-slow", "@uniform-fast"), glance_lists(UNIFORM_SLOW_STEPS, UNIFORM_FAST_STEPS)))
        over = {k: (os.path.join(out, v) if k == "data_backend_config" else uniform.get(v, v) if isinstance(v, str)
                    else v) for k, v in over.items()}
        configs[name] = {**base[src], **over, "output_dir": os.path.join(out, name)}
    return configs


def train_stage(out, configs: dict, force: bool):
    """Run launcher/train.py for each config (in parallel), record wall and CPU time in <out>/times.json."""
    times_path = os.path.join(out, "times.json")
    times = _json(times_path) if os.path.exists(times_path) else {}
    todo = {k: c for k, c in configs.items() if force or k not in times}
    for name, cfg in todo.items():
        os.makedirs(cfg["output_dir"], exist_ok=True)
        _json(os.path.join(out, f"{name}.config.json"), cfg)
    results = run_parallel({name: [sys.executable, os.path.join(REPO, "launcher", "train.py"), "--config",
                                   os.path.join(out, f"{name}.config.json")] for name in todo},
                           {name: os.path.join(out, f"{name}.log") for name in todo}, cwd=REPO)
    failed = []
    for name, r in results.items():
        if r["returncode"] != 0:
            failed.append(name)
            continue
        times = _json(times_path) if os.path.exists(times_path) else {}
        phases = 2 if configs[name].get("method") == "glance" else 1  # Glance: Slow then Fast, each max_train_steps
        times[name] = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "steps": phases * configs[name]["max_train_steps"]}
        _json(times_path, times)
    if failed:  # the logs' tails too: a failure inside a test's temporary folder is otherwise lost with it
        tails = "".join(f"\n--- {n}.log (last 30 lines) ---\n" + "".join(open(os.path.join(out, f"{n}.log"),
                                                                          errors="replace").readlines()[-30:])
                        for n in failed)
        raise SystemExit(f"training failed for {failed}: see " + ", ".join(os.path.join(out, f"{n}.log")
                                                                           for n in failed) + tails)


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


def rows(out):
    """(row, method, NFE, training run, sampling fn of (cond, noise, negative)) for every row whose model exists."""
    import samplers
    from fewstep.sampling import flow_sigmas

    teacher = os.path.join(out, "teacher_pipeline")
    slow, fast = glance_lists()
    out_rows = [(f"teacher-{n}", "teacher (Euler)", n, "teacher",
                 lambda c, z, neg, n=n: samplers.euler(teacher, c, z, flow_sigmas(n))) for n in (1, 2, 4, 10, 50)]
    out_rows.append(("teacher-cfg1.5-50", "teacher (Euler, CFG 1.5)", 50, "teacher",
                     lambda c, z, neg: samplers.euler(teacher, c, z, flow_sigmas(50), negative=neg, cfg_scale=1.5)))
    out_rows += [(f"teacher-10-shift{s}", f"teacher (Euler, 10 steps shifted by {s})", 10, "teacher",
                  lambda c, z, neg, s=s: samplers.euler(teacher, c, z, flow_sigmas(10, shift=s)))
                 for s in TEACHER_SHIFTS]
    out_rows.append(("teacher-glance-schedule-10", "teacher (Euler on the Glance sigmas, no LoRA)", 10, "teacher",
                     lambda c, z, neg: samplers.euler(teacher, c, z, slow + fast)))
    twinflow_runs = [("twinflow_lora", "TwinFlow lora", False), ("twinflow_full", "TwinFlow full", True)]
    twinflow_runs += [(name, f"ablation: TwinFlow {src.split('_')[1]}, {label}", src == "twinflow_full")
                      for name, (src, _, label) in variants(out).items() if src.startswith("twinflow")]
    for key, method, full in twinflow_runs:
        out_rows += [(f"{key.replace('_', '-')}-{n}", method, n, key,
                      lambda c, z, neg, n=n, d=os.path.join(out, key), f=full: samplers.twinflow(teacher, d, c, z, n,
                                                                                                  full=f))
                     for n in (1, 2, 4)]
    glance_runs = [("glance", "Glance (5 Slow + 5 Fast)")]
    glance_runs += [(name, f"ablation: Glance, {label}") for name, (src, _, label) in variants(out).items()
                    if src == "glance"]
    for key, method in glance_runs:
        g = os.path.join(out, key)
        out_rows.append((f"{key.replace('_', '-')}-10", method, 10, key,
                         lambda c, z, neg, g=g: samplers.glance(teacher, os.path.join(g, "glance-slow"),
                                                                os.path.join(g, "glance-fast"), c, z)))
    # only rows whose training run finished (ablations are optional)
    return [r for r in out_rows if r[3] == "teacher" or recipes.finished(os.path.join(out, r[3]))]


def eval_stage(args, S, out, results_dir):
    from safetensors.torch import load_file

    _, held = digits.load_split(args.seed, limit=S["limit"])
    net, ref_feats, ref_stats = features.load_reference(os.path.join(out, "classifier.pt"), held.images)
    emb = load_file(os.path.join(out, "prompts.safetensors"))
    n = S["samples"]
    labels = np.arange(n) % 10
    cond = {k: v[torch.from_numpy(labels)] for k, v in emb.items()}
    negative = {k: v[10:11].expand(n, *v.shape[1:]).contiguous() for k, v in emb.items()}
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed + 1))
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    os.makedirs(results_dir, exist_ok=True)
    report.save_grid(held.images, held.labels, os.path.join(results_dir, "real.png"), S["grid_cols"])
    # the FD floor: real training images (same count as generated) against the held-out split
    train, _ = digits.load_split(args.seed, limit=S["limit"])
    pick = np.random.default_rng(args.seed).permutation(len(train.labels))[:n]
    floor = features.evaluate(net, train.images[pick], train.labels[pick], ref_feats, held.labels, ref_stats)
    _json(os.path.join(out, "eval", "real-train.json"), {"row": "real-train", "method": "real training images",
                                                         "nfe": None, **floor})
    for name, method, nfe, train_key, fn in rows(out):
        path = os.path.join(out, "eval", f"{name}.json")
        if (os.path.exists(path) and not args.force) or (args.rows and not name.startswith(tuple(args.rows))):
            continue
        t0 = time.time()
        pixels = fn(cond, noise, negative).float().numpy()
        sample_s = time.time() - t0
        res = features.evaluate(net, pixels, labels, ref_feats, held.labels, ref_stats)
        report.save_grid(pixels, labels, os.path.join(results_dir, f"{name}.png"), S["grid_cols"])
        _json(path, {"row": name, "method": method, "nfe": nfe, "train": train_key, **res, "sample_s": sample_s})
        print(f"quality: {name}: FD {res['fd']:.2f} acc {res['accuracy']:.3f} div {res['diversity']:.3f} "
              f"({sample_s:.1f} s)", flush=True)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    S = SMOKE if args.smoke else FULL
    out = os.path.abspath(args.out)
    results_dir = args.results or (os.path.join(out, "results") if args.smoke else HERE)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    if "prepare" in args.stages and (args.force or not os.path.exists(os.path.join(out, "prepare.json"))):
        print("quality: prepare", flush=True)
        prepare(args, S, out)
    if "teacher" in args.stages:
        print("quality: teacher (flow matching, full fine-tuning from random init)", flush=True)
        train_stage(out, {"teacher": teacher_config(S, out)}, args.force)
        import pixel_pipeline
        pixel_pipeline.with_transformer(os.path.join(out, "base_pipeline"), os.path.join(out, "teacher", "transformer"),
                                  os.path.join(out, "teacher_pipeline"))
    if args.variant:
        path = os.path.join(out, "variants.json")
        recorded = _json(path) if os.path.exists(path) else {}
        _json(path, {**recorded, **dict(parse_variant(v) for v in args.variant)})
    if "distil" in args.stages:
        configs = {**distil_configs(S, out), **ablation_configs(S, out, args.ablations)}
        print(f"quality: distil ({', '.join(configs)}; in parallel)", flush=True)
        train_stage(out, configs, args.force)
    if "eval" in args.stages:
        print("quality: eval", flush=True)
        eval_stage(args, S, out, results_dir)
    if set(args.stages) - {"report"}:  # record what this invocation did, for RESULTS.md
        argv_used = sys.argv[1:] if argv is None else argv
        path = os.path.join(out, "invocations.json")
        done = _json(path) if os.path.exists(path) else []
        _json(path, done + [{"date": time.strftime("%Y-%m-%d %H:%M", time.localtime(t_start)),
                             "command": " ".join(["python bench/quality/run.py", *argv_used]),
                             "minutes": round((time.time() - t_start) / 60, 1)}])
    if args.export_teacher:
        import teacher_export
        if not os.path.exists(os.path.join(out, "teacher_pipeline", "model_index.json")):
            raise SystemExit("fewstep: --export-teacher: no trained teacher in --out (run the teacher stage first)")
        command = " ".join(["python bench/quality/run.py", *(sys.argv[1:] if argv is None else argv)])
        path = teacher_export.export(out, args.export_teacher, args.export_dtype, S, command)
        print(f"quality: wrote the teacher pipeline {path}", flush=True)
    if "report" in args.stages:
        path = report.write_results(out, results_dir, smoke=args.smoke, settings=S)
        print(f"quality: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
