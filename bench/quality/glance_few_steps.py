#!/usr/bin/env python
"""Glance where steps are scarce (#16 part 3): Slow + Fast LoRA pairs at 4, 5 and 6 total steps against the teacher's
plain schedule at the same NFE, scored as the demo scores.

The Slow and Fast lists are the teacher's own plain N-step Euler grid (`flow_sigmas(N)`, shift 1) split in two
(N = 4: 2 + 2, 5: 2 + 3, 6: 3 + 3), so that without LoRAs a Glance row is exactly the
teacher's row. Each pair is trained
through `launcher/train.py` with the demo's Glance recipe (rank 16 = alpha, 60 steps per phase, batch 1), on one
training image (the demo's "three") or ten (one per class), at the demo's learning rate (5e-5) and at the paper's
FLUX one (5e-4). Every row is sampled from `--noises` start-noise draws (1,000 samples each); FD mean +- std.

    python bench/quality/glance_few_steps.py [--out output/glance_few_steps] [--nfe 4 5 6]
    ... --smoke   # one pair (one image, LR 5e-4) at the demo's smoke sizes: proves the script runs, no claims

Writes `<out>/glance_few_steps.md` and `.json`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from sampler_modes import _demo, draw_scorer  # noqa: E402

SPLITS = {4: 2, 5: 2, 6: 3}  # NFE -> Slow steps (the rest are Fast)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "output", "glance_few_steps"))
    ap.add_argument("--teacher", default=os.path.join(REPO, "data", "digits-teacher"))
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--noises", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one pair at the demo's smoke sizes (for tests; no claims)")
    args = ap.parse_args(argv)
    demo = _demo()
    S = demo.SMOKE if args.smoke else demo.DEMO
    pairs = [("one", 5e-4)] if args.smoke else [(i, lr) for i in ("one", "ten") for lr in (5e-5, 5e-4)]
    import digits
    import recipes
    import samplers
    from fewstep.sampling import flow_sigmas

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    demo.quiet()
    t0 = time.time()
    out = os.path.abspath(args.out)
    train, score = draw_scorer(demo, args.teacher, out, args.noises, S)
    ten = [int(np.flatnonzero(train.labels == k)[0]) for k in range(10)]
    digits.write_dataset(train, os.path.join(out, "data", "ten"), os.path.join(out, "data", "ten.json"), ten)
    n = S["samples"]

    results = []
    for nfe in args.nfe:
        grid = flow_sigmas(nfe)
        slow, fast = grid[:SPLITS[nfe]], grid[SPLITS[nfe]:]
        results.append({"row": "teacher, plain schedule", "nfe": nfe,
                        **score(lambda cond, k, z: samplers.euler(args.teacher, cond, z, grid))})
        print(f"[{time.time() - t0:5.0f} s] teacher @ {nfe}: FD {results[-1]['fd_mean']:.2f}", flush=True)
        for images, lr in pairs:
            name = f"glance-{nfe}-{images}-lr{lr:g}"
            cfg = recipes.glance_config(os.path.join(out, name), args.teacher,
                                        os.path.join(out, "data", f"{images}.json"), os.path.join(out, "cache"),
                                        **{**S["glance"], "learning_rate": lr})
            cfg.update(glance_slow_timesteps=slow, glance_fast_timesteps=fast)
            path = os.path.join(out, f"{name}.config.json")
            with open(path, "w") as fh:
                json.dump(cfg, fh, indent=1)
            if not recipes.finished(cfg["output_dir"]):
                proc = subprocess.run([sys.executable, os.path.join(REPO, "launcher", "train.py"), "--config",
                                       path], cwd=REPO, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
            g = cfg["output_dir"]
            label = (f"Glance {len(slow)} Slow + {len(fast)} Fast, {images} "
                     f"image{'s' if images == 'ten' else ''}, LR {lr:g}")
            results.append({"row": label, "nfe": nfe, **score(lambda cond, k, z: samplers.glance(
                args.teacher, os.path.join(g, "glance-slow"), os.path.join(g, "glance-fast"), cond, z))})
            print(f"[{time.time() - t0:5.0f} s] {label} @ {nfe}: FD {results[-1]['fd_mean']:.2f}", flush=True)
    lines = ["SMOKE RUN (a few samples and steps): no quality claims.", ""] if args.smoke else []
    lines += [f"{n} samples per draw, {args.noises} start-noise draws (FD mean +- std); Slow + Fast lists = the "
             "teacher's plain N-step grid split in two.", "", "| row | NFE | FD | accuracy |", "|---|---:|---:|---:|"]
    lines += [f"| {r['row']} | {r['nfe']} | {r['fd_mean']:.2f} +- {r['fd_std']:.2f} | {100 * r['accuracy']:.1f}% |"
              for r in results]
    with open(os.path.join(out, "glance_few_steps.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "glance_few_steps.json"), "w") as fh:
        json.dump({"samples": n, "noises": args.noises, "smoke": args.smoke, "rows": results}, fh, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
