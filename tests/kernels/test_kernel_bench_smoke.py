"""bench/kernels.py runs: the interpreter smoke mode on CPU, and a clean skip without a GPU."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


def run(*args):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)


def test_interpret_smoke_runs_every_kernel():
    p = run("--interpret-smoke", "--sizes", "2K", "--ema-tensors", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "not a performance figure" in p.stdout
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "elements" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["ema_flat", "ema_list", "rcgm_substep", "rcgm_loss_fwd",
                                                       "rcgm_loss_fwd_bwd"]
    for r in rows:  # the parity check column: every kernel agrees with its reference
        assert float(r.split("|")[3]) <= 1e-5, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_gpu_skips_cleanly():
    p = run()
    assert p.returncode == 0 and "no CUDA device, skipping" in p.stdout
