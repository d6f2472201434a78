"""The README's demo: TwinFlow and Glance distilled from a digits teacher, judged by eye and by a classifier.

    python launcher/demo.py            # about 4 minutes on a 2-core CPU; writes output/demo/
    python launcher/demo.py --smoke    # a few steps and samples: proves the pipeline runs (no quality claims)

1. data     sklearn's handwritten digits (shipped in its wheel), split as the benchmark splits them (seed 0); the
            training digits are written as PNG/caption pairs ("a drawing of three"), Glance gets ONE of them.
2. teacher  data/digits-teacher/, a FLUX-architecture FluxPipeline trained on the training split by
            bench/quality/run.py (its README.md says how), loaded, not trained.
3. train    `launcher/train.py --config <out>/<run>.config.json` in two subprocesses at once: TwinFlow (full
            fine-tune, EMA teacher, self-adversarial branch) to a 1-step generator, and a Glance Slow + Fast LoRA pair
            on the one image. Meanwhile this process trains the classifier and samples the teacher.
4. compare  every row through stock diffusers pipelines with the same prompts and start noise: FD and class accuracy
            against the held-out digits (classifier features), one comparison PNG, a table.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import quality_env  # noqa: E402,F401  (process defaults, before torch)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import digits  # noqa: E402
import features  # noqa: E402
import figure  # noqa: E402
import recipes  # noqa: E402
from train_runs import run_parallel  # noqa: E402

TEACHER = os.path.join(REPO, "data", "digits-teacher")
# TwinFlow: the benchmark's full fine-tune (recipes.TWINFLOW) on a budget of about 2.5 CPU-minutes instead of 8:
# 600 steps at batch 32 instead of 1200 at 64, LR 5e-4 instead of 2e-4 (chosen by measurement: RESULTS.md, Findings).
DEMO = dict(
    limit=None, samples=1000, grid_noises=2, classifier_epochs=30, teacher_steps=50,
    twinflow=dict(train_batch_size=32, max_train_steps=600, learning_rate=5e-4),
    glance=dict(max_train_steps=60, learning_rate=5e-5, lora_rank=16, lora_alpha=16, lr_warmup_steps=10),
)
SMOKE = dict(
    limit=60, samples=20, grid_noises=1, classifier_epochs=1, teacher_steps=4,
    twinflow=dict(train_batch_size=4, max_train_steps=2, learning_rate=5e-4),
    glance=dict(max_train_steps=2, learning_rate=5e-4, lora_rank=4, lora_alpha=16, lr_warmup_steps=1),
)


def parse_args(argv=None):
    from fewstep.cli import OneLineParser

    ap = OneLineParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join("output", "demo"), help="output folder (default: output/demo)")
    ap.add_argument("--teacher", default=TEACHER, help="the teacher FluxPipeline folder (default: data/digits-teacher)")
    ap.add_argument("--smoke", action="store_true", help="a few steps and samples (for tests; no quality claims)")
    return ap.parse_args(argv)


def log(msg: str, t0: float) -> None:
    print(f"demo [{time.time() - t0:5.0f} s] {msg}", flush=True)


def shown(path: str) -> str:
    """A path as the user would type it: relative when under the working directory."""
    here = os.getcwd() + os.sep
    return os.path.relpath(path) if os.path.abspath(path).startswith(here) else path


def last_line(path: str) -> str:
    """The last non-empty line of a log (the trainer's own `fewstep: ...` message when it stops on a mistake)."""
    with open(path, errors="replace") as fh:
        lines = [ln.strip() for ln in fh.read().replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


def fail(msg: str):
    raise SystemExit(f"fewstep: {msg}")


# ----------------------------------------------------------------------------------------------------------------------
# set-up


def quiet() -> None:
    """Keep this process's output to the demo's lines: diffusers' and peft's notices about loading two LoRAs into
    one pipeline (Glance's Slow and Fast, on purpose) are not for the reader."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")


def check_teacher(path: str) -> None:
    """The teacher must be a FluxPipeline folder whose transformer takes the digits' 1-channel latents."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        fail(f"no teacher pipeline at {path} (expected a diffusers folder with model_index.json; the shipped one is "
             "data/digits-teacher, made as its README.md says)")
    cfg_path = os.path.join(path, "transformer", "config.json")
    if not os.path.isfile(cfg_path) or json.load(open(cfg_path)).get("in_channels") != 4:
        fail(f"{path} is not a digits teacher: its transformer must be a FluxTransformer2DModel with in_channels 4 "
             "(1 latent channel, 2x2 packed)")


def write_data(S: dict, out: str):
    """The training split as PNG/caption pairs, Glance's one image (the first training "three"); returns the split."""
    train, held = digits.load_split(0, limit=S["limit"])
    digits.write_dataset(train, os.path.join(out, "data", "train"), os.path.join(out, "data", "train.json"))
    one = [int(np.flatnonzero(train.labels == 3)[0])]
    digits.write_dataset(train, os.path.join(out, "data", "one"), os.path.join(out, "data", "one.json"), one)
    return train, held


def run_configs(S: dict, out: str, teacher: str) -> dict:
    """The two training runs, written to <out>/<name>.config.json (rerun one with launcher/train.py --config)."""
    cache = os.path.join(out, "cache")
    configs = {
        "twinflow": recipes.twinflow_config(os.path.join(out, "twinflow"), teacher,
                                            os.path.join(out, "data", "train.json"), os.path.join(cache, "twinflow"),
                                            full=True, **S["twinflow"]),
        "glance": recipes.glance_config(os.path.join(out, "glance"), teacher, os.path.join(out, "data", "one.json"),
                                        os.path.join(cache, "glance"), **S["glance"]),
    }
    for name, cfg in configs.items():
        with open(os.path.join(out, f"{name}.config.json"), "w") as fh:
            json.dump(cfg, fh, indent=1)
    return configs


def prompt_batch(teacher: str, n: int) -> tuple[dict, np.ndarray]:
    """Embeddings of "a drawing of <digit>" for samples 0..n-1 (sample i is digit i mod 10) and their labels."""
    from fewstep.models import get_adapter

    adapter = get_adapter("flux")
    comps = adapter.load(teacher, with_denoiser=False)
    for tok in comps.tokenizers:
        digits.check_captions(tok)
    emb = adapter.encode_prompts(comps, [digits.caption(k) for k in range(10)])
    labels = np.arange(n) % 10
    return {k: v[torch.from_numpy(labels)].contiguous() for k, v in emb.items()}, labels


# ----------------------------------------------------------------------------------------------------------------------
# rows


def rows(S: dict, out: str, teacher: str) -> list[tuple]:
    """(key, label, NFE, sampler of (cond, noise) -> pixels [N, 16, 16]) for each row of the comparison."""
    import samplers
    from fewstep.sampling import flow_sigmas

    n = S["teacher_steps"]
    tw, g = os.path.join(out, "twinflow"), os.path.join(out, "glance")
    return [
        ("teacher-1", "teacher, 1 step", 1, lambda c, z: samplers.euler(teacher, c, z, flow_sigmas(1))),
        (f"teacher-{n}", f"teacher, {n} steps", n, lambda c, z: samplers.euler(teacher, c, z, flow_sigmas(n))),
        ("twinflow-1", "TwinFlow, 1 step", 1, lambda c, z: samplers.twinflow(teacher, tw, c, z, 1, full=True)),
        ("twinflow-2", "TwinFlow, 2 steps", 2, lambda c, z: samplers.twinflow(teacher, tw, c, z, 2, full=True)),
        ("glance-10", "Glance, 10 steps", 10, lambda c, z: samplers.glance(
            teacher, os.path.join(g, "glance-slow"), os.path.join(g, "glance-fast"), c, z)),
    ]


def evaluate(net, pixels, labels, ref) -> dict:
    """FD and accuracy (and diversity) of generated pixels against the held-out features `ref`."""
    res = features.evaluate(net, pixels, labels, ref["feats"], ref["labels"], ref["stats"])
    if not all(np.isfinite(res[k]) for k in ("fd", "accuracy", "diversity")):
        raise RuntimeError(f"non-finite metrics: {res}")
    return res


def table(results: list[dict]) -> str:
    lines = ["| row | NFE | FD (lower is better) | accuracy |", "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['nfe'] if r['nfe'] else '-'} | {r['fd']:.2f} | {100 * r['accuracy']:.1f}% |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    S = SMOKE if args.smoke else DEMO
    t0 = time.time()
    out, teacher = os.path.abspath(args.out), os.path.abspath(args.teacher)
    check_teacher(teacher)
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {args.out} exists and is not a folder")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    torch.set_num_threads(1)
    quiet()
    log(f"writing sklearn's digits under {os.path.join(args.out, 'data')}; teacher: {shown(teacher)}", t0)
    train, held = write_data(S, out)
    configs = run_configs(S, out, teacher)
    earlier = [name for name in configs if os.path.exists(os.path.join(out, name))]
    if earlier:  # the demo's own runs: trained afresh (a fresh run into a folder with checkpoints is refused)
        log(f"removing the previous demo's {', '.join(earlier)} run{'s' if len(earlier) > 1 else ''} under {args.out}",
            t0)
        for name in earlier:
            shutil.rmtree(os.path.join(out, name))
    tw = S["twinflow"]
    log(f"training in parallel: TwinFlow (full, {tw['max_train_steps']} steps x batch {tw['train_batch_size']}) and "
        f"Glance (Slow + Fast LoRA, {S['glance']['max_train_steps']} steps each, on one image)", t0)
    commands = {name: [sys.executable, os.path.join(REPO, "launcher", "train.py"), "--config",
                       os.path.join(out, f"{name}.config.json")] for name in configs}
    logs = {name: os.path.join(out, "logs", f"{name}.log") for name in configs}
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(run_parallel, commands, logs, REPO, "demo")
        # meanwhile: the classifier, the fixed prompts and noise, the real and teacher rows
        net = features.train_classifier(train.images, train.labels, epochs=S["classifier_epochs"], seed=0)
        ref_feats, pred = features.features_and_predictions(net, held.images)
        ref = {"feats": ref_feats, "labels": held.labels, "stats": features.gaussian_stats(ref_feats)}
        log(f"classifier trained: {100 * (pred == held.labels).mean():.1f}% on the {len(held.labels)} held-out digits",
            t0)
        n = S["samples"]
        cond, labels = prompt_batch(teacher, n)
        noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        pick = np.random.default_rng(0).permutation(len(train.labels))[:n]
        results = [{"key": "real", "label": "real training digits (FD floor)", "nfe": None,
                    **evaluate(net, train.images[pick], train.labels[pick], ref)}]
        grid = [("real held-out digits", None, held.images[[int(np.flatnonzero(held.labels == k)[0])
                                                             for k in range(10)]])]
        todo = rows(S, out, teacher)
        for key, label, nfe, fn in todo:
            if not key.startswith("teacher"):
                if not training.done():
                    log("waiting for the trainings", t0)
                for name, r in training.result().items():
                    if r["returncode"] != 0:
                        fail(f"the {name} training failed (exit {r['returncode']}): {last_line(logs[name])} "
                             f"(log: {shown(logs[name])})")
            pixels = fn(cond, noise).float().numpy()
            results.append({"key": key, "label": label, "nfe": nfe, **evaluate(net, pixels, labels, ref)})
            grid.append((label, results[-1], pixels[:10 * S["grid_noises"]]))
            log(f"sampled {key}: FD {results[-1]['fd']:.2f}, accuracy {100 * results[-1]['accuracy']:.1f}%", t0)
    note = (f"Each column: one prompt and, per line, one start noise, shared by every row. FD (lower is better) and "
            f"accuracy: {n} samples per row against {len(held.labels)} held-out digits; real training digits score "
            f"FD {results[0]['fd']:.1f}.")
    png = figure.comparison(grid, os.path.join(out, "comparison.png"), note)
    md = table(results)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(f"{md}\n\n{n} samples per row ({n // 10} per digit), the same prompts and start noise for every row; "
                 f"FD and accuracy against the {len(held.labels)} held-out digits.\n")
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"samples": n, "held_out": int(len(held.labels)), "rows": results, "png": png,
                   "minutes": (time.time() - t0) / 60}, fh, indent=1)
    print(f"\n{md}\n\n{n} samples per row, the same prompts and start noise for every row; FD (classifier features) "
          f"and class accuracy against {len(held.labels)} held-out digits.\n")
    print("Outputs:")
    for what, path in (("comparison PNG", png), ("table", os.path.join(out, "results.md")),
                       ("TwinFlow model", os.path.join(out, "twinflow", "transformer")),
                       ("Glance LoRAs", os.path.join(out, "glance", "glance-{slow,fast}")),
                       ("training logs", os.path.join(out, "logs", "{twinflow,glance}.log")),
                       ("TensorBoard", os.path.join(out, "{twinflow,glance}", "logs")),
                       ("configs", os.path.join(out, "{twinflow,glance}.config.json")),
                       ("teacher", teacher)):
        print(f"  {what:15s} {shown(path)}")
    log(f"done in {(time.time() - t0) / 60:.1f} min", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
