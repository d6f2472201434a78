"""Shared test fixtures: a tiny dataset and config builder that exercise the same paths users hit."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # without a GPU DeepSpeed must use its CPU accelerator; with one, the tests run on CUDA as users would
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
except ImportError:  # pragma: no cover
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(REPO, "tests"))
# Before any test module imports diffusers (which imports torch._dynamo, which imports Triton): without a GPU,
# `import fewstep` sets TRITON_INTERPRET=1, and Triton reads it once, when it decorates its own library.
import fewstep  # noqa: E402,F401


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU, at most 4. Many tests launch two ranks of their own, and each worker may hold a
    few GB (tiny pipelines, DeepSpeed engines); past 4 the suite waits on its longest files, not on CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


@pytest.fixture
def repo():
    return REPO


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped otherwise): a disk that fills up."""
    from fewstep_testing import mount_small_disk

    mnt = tmp_path / "small"
    if not mount_small_disk(mnt, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
