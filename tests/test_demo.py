"""The README's demo (launcher/demo.py) in smoke mode: the shipped teacher loads, both trainings run through
launcher/train.py, every row is sampled and scored, and the comparison PNG and table are written. Quality is not
asserted here (a few steps and samples); CI runs the full demo through .ci/run."""
import json
import math
import os
import subprocess

import pytest
from PIL import Image

from fewstep_testing import PY, REPO, cpu_env, run

TEACHER = os.path.join(REPO, "data", "digits-teacher")
ROWS = ["real", "teacher-1", "teacher-4", "twinflow-1", "twinflow-2", "glance-10"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run([PY, os.path.join("launcher", "demo.py"), "--smoke", "--out", str(out)], timeout=300)
    return str(out), proc.stdout


def test_shipped_teacher_is_a_small_pipeline_with_its_recipe():
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TEACHER) for f in fs]
    assert 0 < sum(sizes) < 5 * 2 ** 20, "the shipped teacher should stay a few MB"
    with open(os.path.join(TEACHER, "model_index.json")) as fh:
        assert json.load(fh)["_class_name"] == "FluxPipeline"
    readme = open(os.path.join(TEACHER, "README.md")).read()
    assert "python bench/quality/run.py" in readme and "--export-teacher" in readme


def test_smoke_writes_the_comparison_png_and_a_finite_table(smoke):
    out, stdout = smoke
    png = Image.open(os.path.join(out, "comparison.png"))
    assert png.size[0] > 600 and png.size[1] > 6 * 64  # a label column + 10 tiles; one band per row
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["key"] for r in res["rows"]] == ROWS
    for r in res["rows"]:
        assert math.isfinite(r["fd"]) and r["fd"] >= -1e-6, r
        assert 0.0 <= r["accuracy"] <= 1.0, r
    table = open(os.path.join(out, "results.md")).read()
    for label in ("teacher, 1 step", "TwinFlow, 1 step", "TwinFlow, 2 steps", "Glance, 10 steps"):
        assert label in table and label in stdout
    assert "comparison.png" in stdout and "results.md" in stdout


def test_smoke_trains_through_the_real_trainer(smoke):
    out, _ = smoke
    tw = json.load(open(os.path.join(out, "twinflow.config.json")))
    assert tw["method"] == "twinflow" and tw["use_ema"] and tw["twinflow_adversarial_enabled"]
    assert tw["pretrained_model_name_or_path"] == TEACHER
    assert os.path.isfile(os.path.join(out, "twinflow", "transformer", "anystep_embeddings.safetensors"))
    for phase in ("glance-slow", "glance-fast"):
        assert os.path.isfile(os.path.join(out, "glance", phase, "pytorch_lora_weights.safetensors"))
    assert len([f for f in os.listdir(os.path.join(out, "data", "one")) if f.endswith(".png")]) == 1


def test_a_missing_teacher_is_one_line(tmp_path):
    proc = subprocess.run([PY, os.path.join("launcher", "demo.py"), "--smoke", "--teacher", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out")], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("fewstep: no teacher pipeline at") and len(proc.stderr.splitlines()) == 1
