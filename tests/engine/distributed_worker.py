"""Run several short fewstep trainings in one 2-rank process group (start-up is paid once).

Usage: torchrun --nproc_per_node 2 distributed_worker.py CONFIG RUNS_JSON
RUNS_JSON: [[name, {overrides}], ...]; each run writes <output_dir>/<name>. An override `"_nan_fill": true` runs
that training with every uninitialised allocation filled with NaN (torch's deterministic-mode fill, which covers
torch.empty and its kin from Python and C++ alike): on CUDA the caching allocator hands out whatever a freed block
held, on CPU fresh pages are zeros, so code reading memory it never wrote passes here unless the fill exposes it.
"""
import json
import os
import sys

import torch

from fewstep.config import load_config
from fewstep.trainer import train

config, runs = sys.argv[1], json.loads(sys.argv[2])
base_out = load_config(config).output_dir
torch.use_deterministic_algorithms(True, warn_only=True)  # the fill needs it; on CPU no kernel fewstep runs changes
for name, overrides in runs:
    overrides = dict(overrides)
    torch.utils.deterministic.fill_uninitialized_memory = bool(overrides.pop("_nan_fill", False))
    cfg = load_config(config, {**overrides, "output_dir": os.path.join(base_out, name)})
    result = train(cfg)
    assert result["step"] == cfg.max_train_steps * (2 if cfg.resolved_method == "glance" else 1), result

from fewstep.engine.distributed import teardown  # noqa: E402

teardown()
