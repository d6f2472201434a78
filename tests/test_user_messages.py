"""What a user reads: errors that say what the given value is and what was expected (a tiny model of no family, a
file where a model folder goes, a directory where a JSON file goes), launchers without library notices, and
`fewstep:` lines that start a line of their own in a log file, the progress bar's included."""
import io
import subprocess
import sys

import pytest

from fewstep_testing import PY, REPO, cpu_env, write_config, write_dataset


def test_a_tiny_model_of_no_family_is_not_suggested_as_model_family():
    """'tiny:fluxx' suggested "set model_family 'fluxx'", a family that does not exist."""
    from fewstep.errors import ModelFamilyError
    from fewstep.models import get_adapter

    with pytest.raises(ModelFamilyError) as e:
        get_adapter("flux").resolve("tiny:fluxx")
    assert str(e.value) == ("'tiny:fluxx' names no model family (fewstep has flux, qwen_image, sd3, sdxl): for "
                            "model_family 'flux' use 'tiny:flux'")
    with pytest.raises(ModelFamilyError, match="but model_family is 'flux': use 'tiny:flux', or set model_family "
                                               "'sd3'$"):
        get_adapter("flux").resolve("tiny:sd3")  # a family fewstep has: setting it is a fix


def test_a_model_path_that_is_a_file_says_so(tmp_path):
    """It said "model directory ... does not exist"."""
    from fewstep.errors import ModelSourceError
    from fewstep.models import get_adapter

    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelSourceError) as e:
        get_adapter("flux").resolve(str(path))
    assert str(e.value) == (f"{str(path)!r} is a file: expected a diffusers pipeline folder (one with "
                            "model_index.json), a hub id like 'org/name', or 'tiny:<family>'")


def test_a_json_path_that_is_a_directory_says_so(tmp_path):
    """--config and data_backend_config naming a directory said "not found"."""
    from fewstep.config import ConfigError, load_config
    from fewstep.data.backends import load_data_config
    from fewstep.data.errors import DataError

    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    assert str(e.value) == f"config file is a directory, expected a JSON file: {tmp_path}"
    with pytest.raises(DataError) as e:
        load_data_config(str(tmp_path))
    assert str(e.value) == f"data_backend_config is a directory, expected a JSON file: {tmp_path}"


def test_plan_prints_no_library_notices(tmp_path):
    """transformers' import-time torchvision notices reached plan.py's users (train.py and sample.py set its
    verbosity already)."""
    config = tmp_path / "c.json"
    config.write_text('{"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", "output_dir": "o"}')
    env = cpu_env()
    env.pop("TRANSFORMERS_VERBOSITY", None)
    proc = subprocess.run([PY, "launcher/plan.py", "--config", str(config), "--gpus", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "" and "FluxTransformer2DModel" in proc.stdout, proc.stderr


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [io.StringIO, _Terminal])
def test_log_lines_start_a_line_beside_the_progress_bar(monkeypatch, tmp_path, stream):
    """stdout and stderr to one file (a Slurm .out): `fewstep:` lines followed the bar's `\\r` redraws on their line
    there (`grep ^fewstep` missed "checkpoint saved"). In a file the bar now prints lines; on a terminal it redraws
    in place as before, cleared for each log line."""
    from fewstep.metrics import MetricsLogger, log_main

    out = stream()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", out)
    logger = MetricsLogger(str(tmp_path), None, True, False, total_steps=3, start_step=0, desc="flow")
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0, "lr": 1e-4}, samples=1)
        log_main(True, f"checkpoint saved: step-{step}")
        print("fewstep: warning: something", file=sys.stderr)
    logger.close()
    log_main(True, "flow: exported")
    text = out.getvalue()
    if stream is _Terminal:
        assert "\rflow:" in text  # redrawn in place
        return
    lines = text.split("\n")
    assert "\r" not in text and lines[0].startswith("flow:   0%|") and lines[-3].startswith("flow: 100%|"), text
    logged = [ln for ln in lines if "fewstep:" in ln]
    assert len(logged) == 7 and all(ln.startswith("fewstep: ") for ln in logged), text


def test_a_run_resumed_at_its_end_prints_its_bar_once(monkeypatch, tmp_path):
    """In a file, a bar that starts full (resumed at its last step: nothing to train) is one line, not two (its
    close redraws the same bar)."""
    from fewstep.metrics import MetricsLogger

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    MetricsLogger(str(tmp_path), None, True, False, total_steps=2, start_step=2, desc="flow").close()
    lines = [ln for ln in out.getvalue().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("flow: 100%|") and "2/2" in lines[0], lines


@pytest.mark.parametrize("script, argv, said", [
    ("plan.py", ["--config", "configs/demo/flow.json", "--nodes", "x"], "argument --nodes: invalid int value: 'x'"),
    ("plan.py", ["--config", "configs/demo/flow.json", "--gpu_mem_gb", "-5"],
     "argument --gpu_mem_gb: must be > 0, got -5"),
    ("plan.py", ["--config", "configs/demo/flow.json", "--gpus", "8,0"], "--gpus: expected GPU counts above 0"),
    ("plan.py", [], "the following arguments are required: --config"),
    ("demo.py", ["--smok"], "unrecognized arguments: --smok"),  # once taken for --smoke, into output/demo
    ("sample.py", ["--method", "flow", "--prompt", "x", "--lor", "run"], "unrecognized arguments: --lor run"),
])
def test_launcher_argument_mistakes_are_one_line(script, argv, said):
    """argparse printed its usage and a second line, and took an abbreviation for the option it starts."""
    proc = subprocess.run([sys.executable, f"launcher/{script}", *argv], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"fewstep: {said}"), proc.stderr


def test_resume_and_deepspeed_mistakes_are_refused_before_the_model_is_resolved(tmp_path):
    """A bad resume value or deepspeed_config is refused before the model is resolved: for a hub id not yet cached
    that is a download of tens of GB (here, offline, it would be the hub's error instead of the user's mistake)."""
    backend = write_dataset(str(tmp_path), n=1)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 7}}')
    cfg = write_config(str(tmp_path), backend, pretrained_model_name_or_path="no-such-org/no-such-model")
    runs = {"no checkpoint directory at": ["--resume_from_checkpoint", str(tmp_path / "nothing")],
            "zero_optimization.stage must be 0, 1, 2 or 3": ["--deepspeed_config", str(tmp_path / "ds.json")]}
    for said, args in runs.items():
        proc = subprocess.run([PY, "launcher/train.py", "--config", cfg, *args], cwd=REPO, env=cpu_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and said in proc.stderr and "no-such-model" not in proc.stderr, proc.stderr
