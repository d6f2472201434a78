"""Real `checkpoint.save` runs with every `os.fsync` and `os.replace` logged, for tests/test_checkpoint.py.

Run under torchrun (or plain python, a world of one): `checkpoint_worker.py OUT STAGE [STAGE ...]`. For each ZeRO
stage it builds the engine of a tiny Flux LoRA, saves steps 1 and 2 under OUT/z<stage>/checkpoints and writes this
rank's log to OUT/z<stage>/audit-rank<r>.json: [[kind, monotonic ns, path(s)], ...] (kind "fsync" or "replace";
an fsync's path is what its descriptor points at).
"""
import json
import os
import sys
import time


from fewstep import checkpoint
from fewstep.config import load_config
from fewstep.engine.deepspeed_engine import build_engine
from fewstep.engine.distributed import setup_distributed
from fewstep.lora import prepare_trainable
from fewstep.models import get_adapter

events = []
_fsync, _replace = os.fsync, os.replace


def logged_fsync(fd):
    events.append(["fsync", time.monotonic_ns(), os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))])
    return _fsync(fd)


def logged_replace(src, dst, **kw):
    out = _replace(src, dst, **kw)  # logged once done: a later fsync is then known to follow it
    events.append(["replace", time.monotonic_ns(), os.path.realpath(src), os.path.realpath(dst)])
    return out


def main(out: str, stages: list[int]) -> None:
    info = setup_distributed()
    adapter = get_adapter("flux")
    for stage in stages:
        cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux",
                                 "zero_stage": stage, "model_type": "lora", "lora_rank": 4})
        transformer = adapter.load("tiny:flux", with_text=False, with_vae=False).denoiser
        engine, _, _ = build_engine(cfg, transformer, prepare_trainable(cfg, adapter, transformer,
                                                                        anystep_embeddings=False))
        root = os.path.join(out, f"z{stage}", "checkpoints")
        events.clear()
        os.fsync, os.replace = logged_fsync, logged_replace
        try:
            for step in (1, 2):
                checkpoint.save(root, step, engine, info.rank, {"step_of_rank": info.rank}, {"method": "test"},
                                keep=3)
        finally:
            os.fsync, os.replace = _fsync, _replace
        with open(os.path.join(out, f"z{stage}", f"audit-rank{info.rank}.json"), "w") as fh:
            json.dump(events, fh)
    print("CHECKPOINT WORKER OK", flush=True)


if __name__ == "__main__":
    main(os.path.realpath(sys.argv[1]), [int(s) for s in sys.argv[2:]])
    from fewstep.engine.distributed import teardown
    teardown()
