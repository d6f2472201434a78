#!/usr/bin/env python
"""Train with fewstep: `deepspeed launcher/train.py --config configs/demo/flow.json [--key value ...]`.

Also runs under `torchrun`, Slurm's `srun` (RANK/WORLD_SIZE/LOCAL_RANK set) and plain `python` (one process).
Command-line `--key value` pairs override the JSON file; `--help` lists every option.
"""
import sys

from fewstep import preemption

preemption.install()  # first: a SIGUSR1/SIGTERM during imports, model load or engine set-up must not kill the task

from fewstep.config import ConfigError, describe_options, load_config  # noqa: E402
from fewstep.data.dataset import DataError  # noqa: E402


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(describe_options())
        return 0
    config, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank") or a.startswith("--local-rank"):  # passed by the deepspeed launcher
            i += 1 if "=" in a else 2
            continue
        if a == "--config":
            if i + 1 >= len(argv):
                print("fewstep: --config needs a path", file=sys.stderr)
                return 2
            config, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            config, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    try:
        cfg = load_config(config, rest)
    except (ConfigError, ValueError) as e:
        print(f"fewstep: config error: {e}", file=sys.stderr)
        return 2
    from fewstep.engine.distributed import LaunchError, RankFailed
    from fewstep.trainer import train

    try:
        train(cfg)
    except DataError as e:
        print(f"fewstep: data error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError, LaunchError) as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    except RankFailed as e:
        print(f"fewstep: stopping: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
