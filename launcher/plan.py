#!/usr/bin/env python
"""Will it fit? Per-GPU memory of every ZeRO layout for a fewstep config, and the one to use.

    python launcher/plan.py --config my.json --gpus 8 [--nodes 1] [--gpu_mem_gb 80] [--host_mem_gb 1000]
                            [--model_config configs/models/sdxl.json] [--text_tokens 512] [--key value ...]

--config: one or more fewstep configs; --gpus: GPUs in all, a comma list plans each (--gpus 1,8,32);
--nodes: default ceil(gpus / 8).
--gpu_mem_gb / --host_mem_gb: GiB per GPU / per node. Other --key value pairs override the fewstep config
(e.g. --model_type full --lora_rank 64 --resolution 1024 --data_backend_config my_data.json). Nothing touches a GPU:
the model is built on meta.

Resolution: the one the trainer would train at, read by the trainer's own data-backend code: the largest image entry
of data_backend_config (the config's resolution standing for an entry's where it sets none, as in training);
without a data backend the config's resolution, else 1024. Architecture: --model_config, a local diffusers folder's
denoiser config, or for a hub id or a tiny:<family> test model the family's real one in configs/models/. The output
names both sources; the model need not be on this machine. A config or data config the trainer would reject, or a
mistake on the command line, exits 2 with one `fewstep: ...` line.
"""
import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its import-time notices (torchvision) are not for our users

from fewstep.cli import OneLineParser, positive  # noqa: E402
from fewstep.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str]) -> int:
    ap = OneLineParser(description=__doc__)
    ap.add_argument("--config", required=True, nargs="+", help="fewstep JSON config(s)")
    ap.add_argument("--gpus", default="1", help="GPUs in all; a comma list plans each (default 1)")
    ap.add_argument("--nodes", type=positive(int), default=None, help="nodes (default ceil(gpus / 8))")
    ap.add_argument("--gpu_mem_gb", type=positive(float), default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--host_mem_gb", type=positive(float), default=None,
                    help="host GiB per node (checks offload layouts)")
    ap.add_argument("--model_config", default=None,
                    help="diffusers denoiser (transformer or UNet) config.json to plan for")
    ap.add_argument("--text_tokens", type=positive(int), default=None, help="text tokens (default: the pipeline's)")
    ap.add_argument("--overhead_gb", type=float, default=2.0, help="per-GPU runtime overhead: CUDA context, NCCL")
    args, overrides = ap.parse_known_args(argv)
    try:
        gpus = [positive(int)(g) for g in args.gpus.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        print(f"fewstep: --gpus: expected GPU counts above 0, one or a comma list (1,8,32), got {args.gpus!r}",
              file=sys.stderr)
        return 2
    if args.overhead_gb < 0:
        print(f"fewstep: --overhead_gb must be >= 0, got {args.overhead_gb:g}", file=sys.stderr)
        return 2
    try:
        cfgs = [load_config(path, overrides) for path in args.config]
    except ConfigError as e:
        print(f"fewstep: {e}", file=sys.stderr)
        return 2
    from fewstep.planning import format_table, plan_memory

    for i, (cfg, n) in enumerate((cfg, n) for cfg in cfgs for n in gpus):
        try:
            plan = plan_memory(cfg, n, args.nodes, args.gpu_mem_gb, args.host_mem_gb, model_config=args.model_config,
                               text_tokens=args.text_tokens, overhead_gb=args.overhead_gb)
        except ValueError as e:
            print(f"fewstep: {e}", file=sys.stderr)
            return 2
        print(("\n" if i else "") + format_table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
