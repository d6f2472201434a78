#!/usr/bin/env python
"""Every TwinFlow sampler mode at every NFE, on one trained TwinFlow model, scored as the demo scores (#16 part 1).

Rows: target time few / any / mul x stochastic ratio 1 / 0 x NFE 1, 2, 4, 8 (the reference's end gaps per NFE), and
the reference's many-step preset (30 steps, Kumaraswamy (1.17, 0.8, 1.1), s = 0, any). Each row is sampled from
`--noises` start-noise draws (1,000 samples each, 100 per digit, the demo's prompts) and scored against the held-out
digits with the demo's classifier: FD mean and spread over the draws, accuracy.

    python bench/quality/sampler_modes.py --run output/demo/twinflow --full     # the demo's TwinFlow (full FT)
    python bench/quality/sampler_modes.py --run DIR                               # a TwinFlow LoRA export
    ... --smoke   # the demo's smoke sizes (20 samples, a 1-epoch classifier): proves the script runs, no claims
    ... --without-anystep --nfe 1 2   # the default sampler with and without the any-step (tt, sign) embeddings

Writes `<out>/sampler_modes.md` and `.json` (`anystep_ablation.*` with --without-anystep; default out: the run
folder).
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _demo():
    spec = importlib.util.spec_from_file_location("fewstep_digits_demo", os.path.join(HERE, "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(nfes):
    out = [(f"{tt}, s={s:g}", n, dict(target_time=tt, stochastic_ratio=s))
           for n in nfes for tt in ("few", "any", "mul") for s in (1.0, 0.0)
           if not (n == 1 and (tt == "any" or s == 0.0))]  # at 1 NFE: any = few, and s does not act
    out.append(("many-step preset: any, s=0, Kumaraswamy (1.17, 0.8, 1.1), end gap 0", 30,
                dict(target_time="any", stochastic_ratio=0.0, gap_end=0.0, kumaraswamy=(1.17, 0.8, 1.1))))
    return out


def anystep_rows(nfes):
    """The default sampler (`twinflow_sampler(n)`, as validation and sample.py run it) with the any-step embeddings,
    and without them: the weights alone, as a stock pipeline or ComfyUI runs a TwinFlow LoRA."""
    return [(label, n, sampler) for n in nfes for label, sampler in
            (("default sampler, with the any-step embeddings", {}),
             ("default sampler, without them (the weights alone)", {"anystep_embeddings": False}))]


def draw_scorer(demo, teacher: str, data_dir: str, draws: int, S: dict | None = None):
    """The demo's scoring over `draws` start-noise draws (S = the demo's sizes, default `demo.DEMO`: 1,000 samples
    each, the demo's prompts and classifier).

    Returns (the training split, score): `score(fn)` calls `fn(cond, k, noise)` -> pixels for draw k and gives the FD
    of each draw, their mean and std, and the mean class accuracy."""
    import features

    S = S or demo.DEMO
    train, held = demo.write_data(S, data_dir)
    net = features.train_classifier(train.images, train.labels, epochs=S["classifier_epochs"], seed=0)
    ref_feats, _ = features.features_and_predictions(net, held.images)
    ref = {"feats": ref_feats, "labels": held.labels, "stats": features.gaussian_stats(ref_feats)}
    n = S["samples"]
    cond, labels = demo.prompt_batch(teacher, n)
    noises = [torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1 + k)) for k in range(draws)]

    def score(fn) -> dict:
        fds, accs = [], []
        for k, z in enumerate(noises):
            r = demo.evaluate(net, fn(cond, k, z).float().numpy(), labels, ref)
            fds.append(r["fd"])
            accs.append(r["accuracy"])
        return {"fd": fds, "fd_mean": float(np.mean(fds)), "fd_std": float(np.std(fds)),
                "accuracy": float(np.mean(accs))}
    return train, score


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a TwinFlow export (LoRA folder, or full fine-tune with --full)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--teacher", default=os.path.join(REPO, "data", "digits-teacher"))
    ap.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--noises", type=int, default=3)
    ap.add_argument("--no-many-step", action="store_true")
    ap.add_argument("--without-anystep", action="store_true",
                    help="instead of the modes: the default sampler with and without the any-step embeddings")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="the demo's smoke sizes (for tests; no quality claims)")
    args = ap.parse_args(argv)
    demo = _demo()
    S = demo.SMOKE if args.smoke else demo.DEMO
    import samplers

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    demo.quiet()
    t0 = time.time()
    out = args.out or args.run
    _, score = draw_scorer(demo, args.teacher, os.path.join(out, "sampler_modes_data"), args.noises, S)
    n = S["samples"]
    todo = anystep_rows(args.nfe) if args.without_anystep else \
        [r for r in rows(args.nfe) if not (args.no_many_step and r[1] == 30)]
    results = []
    for label, nfe, sampler in todo:
        r = score(lambda cond, k, z: samplers.twinflow(args.teacher, args.run, cond, z, nfe, full=args.full, seed=k,
                                                       **sampler))
        results.append({"mode": label, "nfe": nfe, "sampler": {k: list(v) if isinstance(v, tuple) else v
                                                                 for k, v in sampler.items()}, **r})
        print(f"[{time.time() - t0:5.0f} s] {label} @ {nfe}: FD {r['fd_mean']:.2f} +- {r['fd_std']:.2f}", flush=True)
    lines = ["SMOKE RUN (a few samples, a 1-epoch classifier): no quality claims.", ""] if args.smoke else []
    lines += [f"Run: `{args.run}` ({'full fine-tune' if args.full else 'LoRA'}); {n} samples per draw, "
             f"{args.noises} start-noise draws; FD mean +- std over the draws.", "",
             "| sampler | NFE | FD | accuracy |", "|---|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['nfe']} | {r['fd_mean']:.2f} +- {r['fd_std']:.2f} | {100 * r['accuracy']:.1f}% |"
              for r in results]
    name = "anystep_ablation" if args.without_anystep else "sampler_modes"
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump({"run": args.run, "full": args.full, "noises": args.noises, "samples": n, "smoke": args.smoke,
                   "rows": results}, fh, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
