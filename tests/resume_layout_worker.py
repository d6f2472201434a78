"""Several fewstep trainings in one process group (torchrun, any --nproc_per_node), for tests/test_resume_layout.py.

Usage: resume_layout_worker.py CONFIG RUNS_JSON; RUNS_JSON: [[name, {overrides}], ...], each run writing
<output_dir>/<name>. Per run and rank it writes `outcome-rank<r>.json`: {"ok": result} or, for a refused resume or a
failed save or universal conversion, {"error": class name, "message": ...}. A run's overrides may hold "_env": {variable:
value} for that run alone.

With every save and every restore it also dumps (rank 0) the live trainable state as DeepSpeed's own API sees it,
independently of fewstep's checkpoint files: `saved-step<N>.pt` just before the save, `restored-step<N>.pt` right
after the restore. Each holds, per trainable parameter, the full fp32 master and Adam moments
(`safe_get_full_*`), the engine's step counters, the weights the model computes with (gathered under ZeRO-3) and the EMA (put into the masters
for the gather, then the masters back), plus the Adam step, the learning rate and the cursors. Runs named disk-*
(on a small tmpfs) dump nothing.
"""
import json
import os
import sys

import torch

import fewstep.trainer as trainer_module
from fewstep import checkpoint, checkpoint_resume, reshard
from fewstep.config import load_config
from fewstep.engine import distributed
from fewstep.engine.deepspeed_engine import master_partitions
from fewstep.trainer import train

current = {"out": None}


def dump(engine, ema, extra: dict, path: str) -> None:
    import deepspeed

    inner = reshard._inner(engine)
    keys, step = reshard._adam_state(engine)
    if keys:
        reshard._relink(engine.optimizer)
    named = reshard.trainable_named(engine)
    state = {n: {k: reshard._full(p, k, engine).detach().cpu().clone() for k in [None, *keys]} for n, p in named}
    z3 = [p for _, p in named if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(z3) if z3 else torch.no_grad():
        weights = {n: p.detach().cpu().float().clone() for n, p in named}
    ema_full = None
    if ema is not None:
        masters = master_partitions(engine)
        backup = [m.detach().clone() for m in masters]
        with torch.no_grad():
            for m, s in zip(masters, ema.shadow):
                m.copy_(s)
            ema_full = {n: reshard._full(p, None, engine).detach().cpu().clone() for n, p in named}
            for m, b in zip(masters, backup):
                m.copy_(b)
    counters = {k: int(getattr(engine, k)) for k in ("global_steps", "skipped_steps", "global_samples")}
    if distributed.rank() == 0:
        torch.save({"counters": counters, "state": {n: {("fp32" if k is None else k): v for k, v in d.items()} for n, d in state.items()},
                    "weights": weights, "ema": ema_full, "ema_decay": ema.decay if ema is not None else None,
                    "adam_step": step, "lr": inner.param_groups[0]["lr"], **extra}, path)



class RememberedEMA(trainer_module.EMA):
    """The trainer's EMA, remembered so that the save hook can dump it."""
    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RememberedEMA.last = self


trainer_module.EMA = RememberedEMA
_save, _restore = checkpoint.save, checkpoint_resume.restore


def save(root, step, engine, rank, rank_state, trainer_state, keep, *rest):
    ema = RememberedEMA.last if rank_state.get("ema") is not None else None
    if not os.path.basename(current["out"]).startswith("disk-"):  # runs on a small disk: no dumps there
        dump(engine, ema, {"order": rank_state["order"], "samplers": rank_state["samplers"]},
             os.path.join(current["out"], f"saved-step{step}.pt"))
    return _save(root, step, engine, rank, rank_state, trainer_state, keep, *rest)


def restore(resume, engine, rank, ema=None, seed=0):
    rank_state, trainer_state = _restore(resume, engine, rank, ema=ema, seed=seed)
    dump(engine, ema, {"order": rank_state["order"], "samplers": rank_state["samplers"], "mode": resume.mode},
         os.path.join(current["out"], f"restored-step{trainer_state['step']}.pt"))
    return rank_state, trainer_state


checkpoint.save, checkpoint_resume.restore = save, restore

config, runs = sys.argv[1], json.loads(sys.argv[2])
base_out = load_config(config).output_dir
for name, overrides in runs:
    env = overrides.pop("_env", {})  # environment variables set for this run only
    cfg = load_config(config, {**overrides, "output_dir": os.path.join(base_out, name)})
    current["out"], RememberedEMA.last = cfg.output_dir, None
    os.makedirs(cfg.output_dir, exist_ok=True)
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        outcome = {"ok": train(cfg)}
    except (checkpoint.ResumeMismatch, checkpoint.CheckpointWriteError, reshard.UniversalConversionError) as e:
        outcome = {"error": type(e).__name__, "message": str(e)}
    finally:
        for k, v in saved_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    with open(os.path.join(cfg.output_dir, f"outcome-rank{distributed.rank()}.json"), "w") as fh:
        json.dump(outcome, fh)
print("RESUME LAYOUT WORKER OK", flush=True)
getattr(distributed, "teardown", lambda: None)()  # gloo may abort a rank at interpreter exit otherwise
