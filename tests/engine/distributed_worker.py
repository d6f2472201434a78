"""Run several short fewstep trainings in one 2-rank process group (start-up is paid once).

Usage: torchrun --nproc_per_node 2 distributed_worker.py CONFIG RUNS_JSON
RUNS_JSON: [[name, {overrides}], ...]; each run writes <output_dir>/<name>.
"""
import json
import os
import sys

from fewstep.config import load_config
from fewstep.trainer import train

config, runs = sys.argv[1], json.loads(sys.argv[2])
base_out = load_config(config).output_dir
for name, overrides in runs:
    cfg = load_config(config, {**overrides, "output_dir": os.path.join(base_out, name)})
    result = train(cfg)
    assert result["step"] == cfg.max_train_steps * (2 if cfg.resolved_method == "glance" else 1), result

from fewstep.engine.distributed import teardown  # noqa: E402

teardown()
