"""bench/gpu_check.sh starts and every command line it would run on a GPU is valid: its dry mode on the CPU.

Slow: the dry run is about 2 minutes on 2 idle CPU cores (every step at tiny sizes: collect-only tests, the kernel
interpreter smoke run, two of bench/train_step.py's four runs with --smoke, a 2-step TwinFlow training,
launcher/sample.py). Skip it with `-k "not dry_run"`.
"""
import json
import math
import subprocess

import pytest

from fewstep_testing import REPO, cpu_env

SCRIPT = "bench/gpu_check.sh"
STEPS = ["setup", "diagnose", "kernel_tests", "train", "sample", "sample_tests", "kernels", "train_step"]


def _script(*args, timeout=60, **env):
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=cpu_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    p = _script("--dry", timeout=900, OUT=str(out))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["mode"] == "dry" and [s["step"] for s in data["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in data["steps"]), data["steps"]
    assert data["env"]["versions"]["diffusers"] and data["env"]["device"].startswith("cpu")
    assert "collected" in data["tests"]["kernel_tests"] and "collected" in data["tests"]["sample_tests"]
    ran = {k: t for k, t in data["train_step"].items() if t}  # dry: the two runs that cover every flag
    assert sorted(ran) == ["train_step_all_rows", "train_step_flow"]
    assert {t["method"] for t in ran.values()} == {"twinflow", "flow"} and ran["train_step_all_rows"]["teacher_rows"] \
        == "all"
    for t in ran.values():  # Qwen-Image's smoke runs (tests/bench/test_train_step_smoke.py runs SDXL's)
        assert t["device"].startswith("cpu") and t["family"] == "qwen_image" and t["finite_losses_and_grad_norm"]
        assert all(math.isfinite(t[k]) and t[k] > 0 for k in ("s_per_step", "tflop_per_step", "model_pass_share",
                                                              "non_model_share")), t
        assert t["params_trainable"] > 0 and t["blocks"] > 0
    assert data["train"]["steps"] == 2 and data["train"]["mixed_precision"] == "bf16"
    assert {(r["offload"], r["nfe"]) for r in data["sample"]} == {("none", 1), ("none", 2)}  # offload: no-op on cpu
    summary = (out / "summary.md").read_text()
    assert "| stock FLUX, Euler | cpu | bfloat16 |" in summary and "| as the GPU check | 0 | 3 |" in summary
    assert "DRY RUN on CPU" in summary and "| rcgm_loss_fwd_bwd |" in (out / "kernels.md").read_text()
    log = (out / "steps.log").read_text()
    assert all(f"== {s}: ok" in log for s in STEPS)


def test_only_and_bad_arguments(tmp_path):
    p = _script("--bogus")
    assert p.returncode == 2 and "unknown argument --bogus" in p.stderr
    p = _script("--help")
    assert p.returncode == 0 and "--prepare-wheels" in p.stdout and "carry=[\".whl\"]" in p.stdout
    out = tmp_path / "out"
    p = _script("--dry", "--only", "kernels", timeout=300, OUT=str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [s["step"] for s in json.loads((out / "gpu_check.json").read_text())["steps"]] == ["setup", "kernels"]


def test_step_budgets_fit_the_run_budget():
    """The steps' budgets add up to at most the run's (540 s, in the 600 s device call): a step given more time than
    is left is cut to what is left, so an over-subscribed plan starves the last steps on the GPU (the dry run, at
    3x budgets and tiny sizes, would not show it)."""
    import re

    text = open(f"{REPO}/{SCRIPT}").read()
    budgets = {name: int(s) for name, s in re.findall(r"^run_step (\w+) (\d+) ", text, flags=re.M)}
    assert list(budgets) == STEPS
    total = int(re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET_S:-(\d+)\} SCALE=1", text).group(1))
    assert sum(budgets.values()) <= total == 540, budgets


def test_shellcheck_clean():
    from fewstep_testing import system_packages_missing
    reason = system_packages_missing(["shellcheck"], ["/usr/bin/shellcheck"])  # installed if it can be (root)
    if reason is not None:
        pytest.skip(reason)
    p = subprocess.run(["shellcheck", "-S", "warning", SCRIPT], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


def test_every_diagnosis_variant_is_a_valid_config(tmp_path):
    """bench/cuda_diagnose.py's training variants each pass fewstep's config checks (a variant refused at start-up
    would read as a failure of the change it tests, and burn device time)."""
    import importlib.util
    import os

    from fewstep.config import load_config

    spec = importlib.util.spec_from_file_location("cuda_diagnose", os.path.join(REPO, "bench", "cuda_diagnose.py"))
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    for name, change in diagnose.VARIANTS:
        cfg = diagnose.variant_config({**diagnose.BASE_CONFIG, "output_dir": str(tmp_path / "out")}, change)
        load_config(None, cfg)  # raises ConfigError naming the key
