"""Freed host tensors go back to the OS: the trainer fixes glibc's mmap threshold (`fewstep.engine.host_memory`).

The probe allocates and frees one 24 MiB tensor (glibc's moving threshold rises to 24 MiB), then 64 tensors of 4 MiB,
and frees all but the last: with the moving threshold they came from the heap, and the 252 MiB below the live one stay
resident; with the threshold fixed each was its own mmap and went back to the OS on free."""
import json
import os
import subprocess
import sys

import pytest

from fewstep_testing import PY, REPO, cpu_env, write_config, write_dataset

PROBE = """
import json, torch
def rss():
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024
def retained():
    x = torch.empty(24 << 20, dtype=torch.uint8); x.fill_(1); del x
    base = rss()
    kept = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(64)][-1]
    return rss() - base
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")


def _run(code: str, **env) -> dict:
    environ = {k: v for k, v in cpu_env().items() if k != "MALLOC_MMAP_THRESHOLD_"}
    environ.update(env)
    proc = subprocess.run([PY, "-c", PROBE + code], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": proc.stdout, **json.loads(proc.stdout.strip().splitlines()[-1])}


def test_fixed_threshold_returns_freed_tensors():
    call = "from fewstep.engine.host_memory import fix_mmap_threshold\nmsg = fix_mmap_threshold({})\n"
    moving = _run(call.format(0) + "print(json.dumps({'mb': retained(), 'msg': msg}))")
    fixed = _run(call.format(2 ** 20) + "print(json.dumps({'mb': retained(), 'msg': msg}))")
    assert moving["mb"] > 200, moving  # glibc's default keeps them
    assert fixed["mb"] < 32, fixed
    assert fixed["msg"] == "glibc mmap threshold fixed at 1 MiB"
    env = _run(call.format(2 ** 20) + "print(json.dumps({'mb': retained(), 'msg': msg}))",
               MALLOC_MMAP_THRESHOLD_="65536")  # the user's own setting wins (and glibc applies it)
    assert "from the environment" in env["msg"] and env["mb"] < 32


def test_trainer_fixes_the_threshold_on_every_run(tmp_path):
    """A training run in this process, then the probe: the trainer left the threshold fixed (its default option)."""
    backend = write_dataset(str(tmp_path), n=2)
    cfg = write_config(str(tmp_path), backend, model_type="lora", max_train_steps=1)
    got = _run(f"""
from fewstep.config import load_config
from fewstep.trainer import train
from fewstep.engine.distributed import teardown
train(load_config({cfg!r}, []))
teardown()  # as launcher/train.py ends (gloo can abort an exit with its group alive)
print(json.dumps({{'mb': retained()}}))
""")
    assert got["mb"] < 32, got
    assert "fewstep: host memory: glibc mmap threshold fixed at 1 MiB" in got["out"]
