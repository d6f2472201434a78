"""A small version of bench/memory.py in CI: a reduced-width Qwen-Image-architecture transformer (2 blocks, 4 heads
of 128), full fine-tuning with EMA under ZeRO-3 on 2 ranks through launcher/train.py; each stage's peak host memory
per rank (load, train, validation + exports) must stay within 15% above the planner's figure for that stage."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(os.geteuid() != 0, reason="resetting a process's peak RSS (/proc/PID/clear_refs) needs root")
def test_stage_peaks_within_the_planner(tmp_path):
    proc = subprocess.run([sys.executable, "bench/memory.py", "--case", "full", "--blocks", "2", "--heads", "4",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "full-2x4h" / "memory.json").read_text())
    peaks, planner = result["peaks_gib"], result["planner_gib"]
    assert set(planner) == {"load", "train", "export"} and all(len(peaks[s]) == 2 for s in planner)
    for stage, predicted in planner.items():
        assert max(peaks[stage]) <= 1.15 * predicted, (stage, peaks[stage], predicted)
    assert max(peaks["load"]) < max(peaks["train"])  # the measurement sees the stages apart
    assert result["allocator"] == "glibc mmap threshold fixed at 1 MiB"  # what the planner's figures assume
