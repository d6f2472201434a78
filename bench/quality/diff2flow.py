#!/usr/bin/env python
"""diff2flow on real data (issue #20 item 5): TwinFlow students from epsilon- and v-prediction SDXL-layout teachers.

    python bench/quality/diff2flow.py                   # the full benchmark (about 30 minutes on 2 CPU cores)
    python bench/quality/diff2flow.py --smoke --out D   # tiny sizes, a minute or two: proves the pipeline runs
    python bench/quality/diff2flow.py --stages eval report   # re-run some stages (finished ones skip unless --force)

Stages: prepare (data split, dataset, two StableDiffusionXLPipeline folders (`unet_pipeline.py`): epsilon and
v_prediction, same weights; prompt embeddings, classifier) -> teacher (a plain PyTorch DDPM loop per folder, the two
in parallel subprocesses) -> distil (`launcher/train.py --config`: model_family sdxl, diff2flow, TwinFlow full fine-tune
from each teacher, in parallel) -> eval (per prediction type in parallel subprocesses; every row through a stock
StableDiffusionXLPipeline from the same start noise: teachers with DDIM (trailing spacing), students with
TwinFlowScheduler; FD over 3 noise draws, one JSON per row) -> report (a section of RESULTS.md between the diff2flow
markers, PNG grids `d2f-<row>.png`). Data, classifier and metrics are the digits benchmark's (run.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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
import unet_pipeline  # noqa: E402
from train_runs import run_parallel  # noqa: E402

STAGES = ("prepare", "teacher", "distil", "eval", "report")
KINDS = {"eps": "epsilon", "v": "v_prediction"}
TEACHER_NFE, STUDENT_NFE = (1, 2, 4, 10, 50), (1, 2, 4)
BEGIN, END = "<!-- diff2flow:begin -->", "<!-- diff2flow:end -->"
FULL = dict(limit=None, classifier_epochs=30, samples=1000, draws=3, grid_cols=8, unet=unet_pipeline.UNET,
            teacher=dict(steps=2000, batch=64, lr=1e-3, warmup=100),
            # the digits benchmark's TwinFlow full fine-tune budget (run.py FULL["twinflow_full"]); the demo's
            # (600 x 32, LR 5e-4) gave 1-NFE FD 87.7 (epsilon) / 54.0 (v) on 2026-12-04
            student=dict(train_batch_size=64, max_train_steps=1200, learning_rate=2e-4))
SMOKE = dict(limit=60, classifier_epochs=2, samples=40, draws=3, grid_cols=2, unet=unet_pipeline.UNET_SMOKE,
             teacher=dict(steps=3, batch=8, lr=1e-3, warmup=1),
             student=dict(train_batch_size=4, max_train_steps=2, learning_rate=5e-4))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "output", "diff2flow"), help="work directory")
    ap.add_argument("--results", default=None, help="RESULTS.md and PNGs (default bench/quality; <out> with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (no quality claims)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--force", action="store_true", help="redo finished stages / rows of the selected stages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=[f"{s}-{k}" for s in ("teacher", "eval") for k in KINDS],
                    help=argparse.SUPPRESS)  # a subprocess of the teacher / eval stage
    return ap.parse_args(argv)


def _json(path, obj=None):
    if obj is None:
        with open(path) as fh:
            return json.load(fh)
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(path + ".tmp", path)
    return obj


def log(msg):
    print(f"diff2flow: {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# prepare, teachers, students


def prepare(args, S, out):
    from safetensors.torch import save_file

    from fewstep.models import get_adapter

    train, held = digits.load_split(args.seed, limit=S["limit"])
    digits.write_dataset(train, os.path.join(out, "data", "train"), os.path.join(out, "data", "train.json"))
    mean, std = digits.pixel_stats(train)
    for k, pred in KINDS.items():  # same seed: identical weights, only the scheduler's prediction_type differs
        unet_pipeline.save_pipeline(os.path.join(out, f"base_{k}"), pred, mean, std, digits.RESOLUTION,
                                    seed=args.seed, **S["unet"])
    adapter = get_adapter("sdxl")
    comps = adapter.load(os.path.join(out, "base_eps"), with_denoiser=False)
    for tok in comps.tokenizers:
        digits.check_captions(tok)
    emb = adapter.encode_prompts(comps, [digits.caption(k) for k in range(10)] + [""])
    assert all(float(v[10].abs().max()) == 0.0 for v in emb.values()), "SDXL's empty prompt must encode as zeros"
    rgb = torch.from_numpy(train.images)[:, None].expand(-1, 3, -1, -1)
    latents = adapter.encode_images(comps.vae, rgb)  # fewstep's encode: what the students train on
    back = adapter.decode_latents(comps.vae, latents).mean(1)
    save_file({"latents": latents.contiguous(), "labels": torch.from_numpy(train.labels),
               **{k: v.contiguous() for k, v in emb.items()}}, os.path.join(out, "prepared.safetensors"))
    t0 = time.time()
    net = features.train_classifier(train.images, train.labels, epochs=S["classifier_epochs"], seed=args.seed)
    torch.save(net.state_dict(), os.path.join(out, "classifier.pt"))
    _, pred = features.features_and_predictions(net, held.images)
    _json(os.path.join(out, "prepare.json"), {
        "train": int(len(train.labels)), "held_out": int(len(held.labels)), "pixel_mean": mean, "pixel_std": std,
        "latent_mean": float(latents.mean()), "latent_std": float(latents.std()),
        "vae_roundtrip_max_err": float((back - torch.from_numpy(train.images)).abs().max()),
        "classifier_held_out_accuracy": float((pred == held.labels).mean()), "classifier_train_s": time.time() - t0,
        "unet_params": sum(p.numel() for p in unet_pipeline.unet(**S["unet"]).parameters())})


def teacher_worker(args, S, out, kind):
    from safetensors.torch import load_file

    d = load_file(os.path.join(out, "prepared.safetensors"))
    cond = {k: d[k][:10] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    t = S["teacher"]
    info = unet_pipeline.train_teacher(os.path.join(out, f"base_{kind}"), os.path.join(out, f"teacher_{kind}"),
                                       d["latents"], d["labels"], cond, steps=t["steps"], batch=t["batch"],
                                       lr=t["lr"], warmup=t["warmup"], seed=args.seed, log=log)
    _json(os.path.join(out, f"teacher_{kind}.json"), info)


def student_config(S, out, kind):
    cfg = recipes.twinflow_config(os.path.join(out, f"student_{kind}"), os.path.join(out, f"teacher_{kind}"),
                                  os.path.join(out, "data", "train.json"), os.path.join(out, f"cache_{kind}"),
                                  full=True, **S["student"])
    return {**cfg, "model_family": "sdxl", "prediction_type": KINDS[kind], "diff2flow_enabled": True,
            "twinflow_allow_diff2flow": True}


def train_stage(args, out, commands: dict, done: dict):
    """Run the commands (in parallel) whose run is not done; times go to <out>/times.json."""
    times_path = os.path.join(out, "times.json")
    todo = {k: c for k, c in commands.items() if args.force or not done[k]}
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    results = run_parallel(todo, {k: os.path.join(out, "logs", f"{k}.log") for k in todo}, cwd=REPO, tag="diff2flow")
    times = _json(times_path) if os.path.exists(times_path) else {}
    times.update({k: r for k, r in results.items() if r["returncode"] == 0})
    _json(times_path, times)
    failed = [k for k, r in results.items() if r["returncode"] != 0]
    if failed:
        raise SystemExit(f"diff2flow: {failed} failed: see " + ", ".join(os.path.join(out, "logs", f"{k}.log")
                                                                         for k in failed))


def _self(args, worker):
    return [sys.executable, os.path.abspath(__file__), "--worker", worker, "--out", os.path.abspath(args.out),
            "--seed", str(args.seed), *(["--smoke"] if args.smoke else []), *(["--force"] if args.force else [])]


# ----------------------------------------------------------------------------------------------------------------------
# sampling through the stock StableDiffusionXLPipeline, and scoring


def load_pipe(teacher_dir, unet_dir=None):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    extra = {"unet": UNet2DConditionModel.from_pretrained(unet_dir)} if unet_dir else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher_dir, add_watermarker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, cond, z, steps):
    """Stock pipe(...) from cached embeddings and the start latents, no CFG -> grey pixels [N, 16, 16] in [-1, 1]."""
    side = z.shape[-1] * pipe.vae_scale_factor
    img = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
               latents=z.clone(), guidance_scale=1.0, num_inference_steps=steps, height=side, width=side,
               output_type="pt").images
    return img.float().mean(1) * 2 - 1


def teacher_sampler(teacher_dir):
    from diffusers import DDIMScheduler

    pipe = load_pipe(teacher_dir)  # trailing: 1 step starts at t = 999 from pure noise; no x0 clipping
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    return lambda cond, z, n, k: sample(pipe, cond, z, n)


def student_sampler(teacher_dir, run_dir):
    from fewstep.models import anystep, get_adapter
    from fewstep.sampling import anystep_dir
    from fewstep.schedulers import TwinFlowScheduler
    from fewstep.schedulers.twinflow import twinflow_preset

    pipe = load_pipe(teacher_dir, os.path.join(run_dir, "unet"))  # a full fine-tune's unet/ is a stock UNet folder
    get_adapter("sdxl").add_anystep(pipe.unet)
    anystep.load_anystep(pipe.unet, anystep_dir(run_dir, "unet"))
    config = pipe.scheduler.config  # the folder's: betas and prediction_type carry over

    def fn(cond, z, n, k):
        pipe.scheduler = TwinFlowScheduler.from_config(config, **twinflow_preset(n))
        torch.manual_seed(k)  # the scheduler's re-noising draws from the global RNG
        with anystep.anystep_state(pipe.unet, sign=1.0, scheduler=pipe.scheduler):
            return sample(pipe, cond, z, n)
    return fn


def scorer(args, S, out):
    """(score(images_fn) -> metrics over the draws, per-draw cond, labels)."""
    from safetensors.torch import load_file

    _, held = digits.load_split(args.seed, limit=S["limit"])
    net, ref_feats, ref_stats = features.load_reference(os.path.join(out, "classifier.pt"), held.images)
    d = load_file(os.path.join(out, "prepared.safetensors"))
    n = S["samples"]
    labels = np.arange(n) % 10
    cond = {k: d[k][torch.from_numpy(labels)] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    noises = [torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed + 1 + k))
              for k in range(S["draws"])]

    def score(fn):
        res, first = [], None
        for k, z in enumerate(noises):
            pixels = fn(cond, z, k)
            pixels = pixels.numpy() if torch.is_tensor(pixels) else pixels
            first = pixels if first is None else first
            res.append(features.evaluate(net, pixels, labels, ref_feats, held.labels, ref_stats))
        fds = [r["fd"] for r in res]
        return {"fd": fds, "fd_mean": float(np.mean(fds)), "fd_std": float(np.std(fds)),
                "accuracy": float(np.mean([r["accuracy"] for r in res])),
                "diversity": float(np.mean([r["diversity"] for r in res])), "n": n}, first, labels
    return score


def rows(out, kind):
    """(row, label, NFE, make sampler) for one prediction type."""
    teacher = os.path.join(out, f"teacher_{kind}")
    name = KINDS[kind].replace("v_prediction", "v")
    r = [(f"teacher-{kind}-{n}", f"teacher ({name}), DDIM trailing", n, lambda: teacher_sampler(teacher))
         for n in TEACHER_NFE]
    r += [(f"twinflow-{kind}-{n}", f"TwinFlow diff2flow ({name})", n,
           lambda: student_sampler(teacher, os.path.join(out, f"student_{kind}"))) for n in STUDENT_NFE]
    return r


def eval_worker(args, S, out, kind, results_dir):
    score = scorer(args, S, out)
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    cache = {}
    for row, label, nfe, make in rows(out, kind):
        path = os.path.join(out, "eval", f"{row}.json")
        if os.path.exists(path) and not args.force:
            continue
        key = row.rsplit("-", 1)[0]
        cache[key] = cache.get(key) or make()  # one pipeline per model
        t0 = time.time()
        res, first, labels = score(lambda cond, z, k: cache[key](cond, z, nfe, k))
        report.save_grid(first, labels, os.path.join(results_dir, f"d2f-{row}.png"), S["grid_cols"])
        _json(path, {"row": row, "method": label, "nfe": nfe, **res, "sample_s": time.time() - t0})
        log(f"{row}: FD {res['fd_mean']:.2f} +- {res['fd_std']:.2f} acc {res['accuracy']:.3f} "
            f"div {res['diversity']:.3f} ({time.time() - t0:.0f} s)")


def real_floor(args, S, out, results_dir):
    """The FD floor: real training images (as many as generated, one subset per draw) against the held-out split."""
    train, held = digits.load_split(args.seed, limit=S["limit"])
    score = scorer(args, S, out)
    picks = [np.random.default_rng(args.seed + k).permutation(len(train.labels))[:S["samples"]]
             for k in range(S["draws"])]
    res, _, _ = score(lambda cond, z, k: train.images[picks[k]])
    res["accuracy"] = float(np.mean([(features.features_and_predictions(
        _classifier(out), train.images[p])[1] == train.labels[p]).mean() for p in picks]))
    res["diversity"] = None  # the prompted labels are not these images' labels
    report.save_grid(held.images, held.labels, os.path.join(results_dir, "d2f-real.png"), S["grid_cols"])
    _json(os.path.join(out, "eval", "real-train.json"), {"row": "real-train", "method": "real training images",
                                                         "nfe": None, **res})


def _classifier(out):
    net = features.DigitNet()
    net.load_state_dict(torch.load(os.path.join(out, "classifier.pt")))
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------------
# report


def section(args, S, out, results_dir, runs) -> str:
    from diffusers import DDPMScheduler

    from fewstep.methods import diff2flow as d2f

    ev = {r: _json(os.path.join(out, "eval", f"{r}.json")) for r in
          ["real-train"] + [row for k in KINDS for row, *_ in rows(out, k)]}
    times, prep = _json(os.path.join(out, "times.json")), _json(os.path.join(out, "prepare.json"))
    fmt = lambda r: f"{r['fd_mean']:.2f} ± {r['fd_std']:.2f}"  # noqa: E731
    lines = [BEGIN, "## diff2flow on real data: TwinFlow students of epsilon and v-prediction SDXL teachers", "",
             f"Generated by `bench/quality/diff2flow.py` ({'SMOKE run: no quality claims' if args.smoke else 'full'})"
             f"; do not edit by hand. {S['samples']} samples per draw ({S['samples'] // 10} per digit), FD mean ± std "
             f"over {S['draws']} start-noise draws (the same draws for every row), accuracy and diversity averaged; "
             "no CFG.",
             "", "| row | sampler | NFE | FD | accuracy | diversity | samples |", "|---|---|---:|---:|---:|---:|---|",
             f"| real training images (floor) | - | - | {fmt(ev['real-train'])} | "
             f"{100 * ev['real-train']['accuracy']:.1f}% | - | [grid](d2f-real.png) |"]
    for k in KINDS:
        for row, label, nfe, _ in rows(out, k):
            r = ev[row]
            sampler = "DDIM, trailing" if row.startswith("teacher") else "TwinFlowScheduler, `twinflow_preset(n)`"
            lines.append(f"| {label.split(',')[0]} | {sampler} | {nfe} | {fmt(r)} | {100 * r['accuracy']:.1f}% | "
                         f"{r['diversity']:.3f} | [grid](d2f-{row}.png) |")
    lines += ["", "**Targets** (students; FD means):", ""]
    for k in KINDS:
        t50, s1, s4 = (ev[f"teacher-{k}-50"]["fd_mean"], ev[f"twinflow-{k}-1"]["fd_mean"],
                       ev[f"twinflow-{k}-4"]["fd_mean"])
        lines.append(f"* {KINDS[k]}: 1-NFE FD {s1:.2f} ≤ 1.3 × teacher 50-step FD {t50:.2f} = {1.3 * t50:.2f}: "
                     f"**{'met' if s1 <= 1.3 * t50 else 'NOT met'}** (ratio {s1 / t50:.2f}); FD(4 NFE) {s4:.2f} ≤ "
                     f"FD(1 NFE) {s1:.2f}: **{'met' if s4 <= s1 else 'NOT met'}** (difference {s4 - s1:+.2f}).")
    abar = DDPMScheduler(**unet_pipeline.BETAS).alphas_cumprod
    lo, hi = d2f.sigma_range(abar)
    e1, e50, s1 = ev["teacher-eps-1"], ev["teacher-eps-50"], ev["twinflow-eps-1"]
    lines += ["", f"**Time above the base's range.** The bridge covers sigma in [{lo:.3f}, {hi:.3f}]; at sigma = 1 "
              f"(pure noise) it uses the base's x0 estimate at its last timestep, so a one-step sample of the epsilon "
              f"teacher through the bridge is exactly its DDIM 1-step row: FD {fmt(e1)}, against {fmt(e50)} at 50 "
              f"steps. That is where the student starts; after distillation its 1-NFE FD is {fmt(s1)}.", ""]
    t, st = S["teacher"], S["student"]
    lines += ["**Settings.** Data: sklearn digits, 16x16, the benchmark's split (train "
              f"{prep['train']}, held out {prep['held_out']}); the pixel VAE with the training-pixel mean "
              f"({prep['pixel_mean']:.3f}) folded into its biases, shift_factor None, scaling_factor 1/std "
              f"(1/{prep['pixel_std']:.3f}), so fewstep's adapter and the stock pipeline decode alike (round trip "
              f"max error {prep['vae_roundtrip_max_err']:.1e}). UNet: SDXL layout, block_out_channels "
              f"{tuple(S['unet']['block_out_channels'])}, layers_per_block {S['unet']['layers_per_block']}, "
              f"cross_attention_dim 64, text_time micro-conditioning, {prep['unet_params'] / 1e6:.2f} M parameters; "
              "tiny SDXL text encoders. Scheduler: SDXL's EulerDiscrete config (scaled-linear betas "
              "0.00085-0.012, 1000 steps), prediction_type epsilon / v_prediction. "
              f"Teachers: plain DDPM loop (`unet_pipeline.train_teacher`), uniform timesteps, {t['steps']} steps x "
              f"batch {t['batch']}, AdamW lr {t['lr']} cosine, warmup {t['warmup']}, caption dropout 0.1 to zeros, "
              f"fp32. Students: `launcher/train.py`, model_family sdxl, diff2flow, TwinFlow full fine-tune "
              f"(recipes.TWINFLOW), {st['max_train_steps']} steps x batch {st['train_batch_size']}, "
              f"LR {st['learning_rate']}. Teachers sampled with `DDIMScheduler.from_config(..., "
              "timestep_spacing='trailing', clip_sample=False)`; students with "
              "`TwinFlowScheduler.from_config(pipe.scheduler.config, **twinflow_preset(n))` and the any-step "
              "embeddings.", "", "**Training time** (wall, CPU; one thread each, two runs at once on 2 cores):", ""]
    for k in ("teacher-eps", "teacher-v", "student-eps", "student-v"):
        if k in times:
            lines.append(f"* {k}: {times[k]['wall_s'] / 60:.1f} min wall, {times[k]['cpu_s'] / 60:.1f} CPU-min")
    lines += ["", "**Runs:**", ""] + [f"* {r['date']}: `{r['command']}` ({r['minutes']} min wall, "
                                     f"{r['cpu_min']} CPU-min)" for r in runs] + [END]
    return "\n".join(lines) + "\n"


def write_section(path, text):
    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    with open(path, "w") as fh:
        fh.write(new)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    S = SMOKE if args.smoke else FULL
    out = os.path.abspath(args.out)
    results_dir = os.path.abspath(args.results or (os.path.join(out, "results") if args.smoke else HERE))
    os.makedirs(results_dir, exist_ok=True)
    torch.set_num_threads(1)
    if args.worker:
        stage, kind = args.worker.split("-")
        return teacher_worker(args, S, out, kind) if stage == "teacher" else eval_worker(args, S, out, kind,
                                                                                          results_dir) or 0
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    if "prepare" in args.stages and (args.force or not os.path.exists(os.path.join(out, "prepare.json"))):
        log("prepare")
        prepare(args, S, out)
    if "teacher" in args.stages:
        log(f"teachers (DDPM, {S['teacher']['steps']} steps each, in parallel)")
        train_stage(args, out, {f"teacher-{k}": _self(args, f"teacher-{k}") for k in KINDS},
                    {f"teacher-{k}": os.path.exists(os.path.join(out, f"teacher_{k}.json")) for k in KINDS})
    if "distil" in args.stages:
        log(f"students (TwinFlow diff2flow, {S['student']['max_train_steps']} steps each, in parallel)")
        for k in KINDS:
            _json(os.path.join(out, f"student-{k}.config.json"), student_config(S, out, k))
        train_stage(args, out, {f"student-{k}": [sys.executable, os.path.join(REPO, "launcher", "train.py"),
                                                 "--config", os.path.join(out, f"student-{k}.config.json")]
                                for k in KINDS},
                    {f"student-{k}": recipes.finished(os.path.join(out, f"student_{k}")) for k in KINDS})
    if "eval" in args.stages:
        log("eval (epsilon and v rows in parallel)")
        os.makedirs(os.path.join(out, "eval"), exist_ok=True)
        real_floor(args, S, out, results_dir)
        cmds = {f"eval-{k}": _self(args, f"eval-{k}") + ["--results", results_dir] for k in KINDS}
        train_stage(args, out, cmds, {k: False for k in cmds})
    runs_path = os.path.join(out, "invocations.json")
    runs = _json(runs_path) if os.path.exists(runs_path) else []
    if set(args.stages) - {"report"}:
        usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        argv_used = sys.argv[1:] if argv is None else argv
        runs = _json(runs_path, runs + [{"date": time.strftime("%Y-%m-%d %H:%M", time.localtime(t_start)),
                                         "command": " ".join(["python bench/quality/diff2flow.py", *argv_used]),
                                         "minutes": round((time.time() - t_start) / 60, 1),
                                         "cpu_min": round(sum(u.ru_utime + u.ru_stime for u in usage) / 60, 1)}])
    if "report" in args.stages:
        path = os.path.join(results_dir, "RESULTS.md")
        write_section(path, section(args, S, out, results_dir, runs))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
