"""Several short trainings in one 2-rank process group, each with its own fault-injection environment.

Usage: torchrun --nproc_per_node 2 nan_training_worker.py CONFIG RUNS_JSON
RUNS_JSON: [[name, {overrides}, {env}], ...]; each run writes <output_dir>/<name> and prints "RESULT name <json>".
"""
import json
import os
import sys

from fewstep import faults
from fewstep.config import load_config
from fewstep.errors import NonFiniteStop
from fewstep.trainer import train

config, runs = sys.argv[1], json.loads(sys.argv[2])
base_out = load_config(config).output_dir
for name, overrides, env in runs:
    os.environ.update(env)
    faults._nan_attempts["n"] = 0  # each run injects afresh
    cfg = load_config(config, {**overrides, "output_dir": os.path.join(base_out, name)})
    try:
        result = train(cfg)
    except NonFiniteStop as e:
        result = {"stopped": str(e)}
    for k in env:
        del os.environ[k]
    if int(os.environ["RANK"]) == 0:
        print("RESULT", name, json.dumps(result), flush=True)

from fewstep.engine.distributed import teardown  # noqa: E402

teardown()
