"""launcher/sample.py refuses what cannot sample before any model loads: an export that misses the weights its
fewstep_run.json records, a --method other than the run's, a run info that is no JSON, an --output it could not write,
a folder that does not exist. Each ends in one `fewstep: ...` line and exit status 2.

The exports are folders as the trainer leaves them: its fewstep_run.json (`write_run_info` of a validated config) and
the files it writes beside it, as placeholders: nothing here gets as far as reading weights (the adapter's `load`
fails the test if called), so no training is needed.
"""
import os
import subprocess

import pytest

from fewstep_testing import PY, REPO, cpu_env, load_launcher

SLOW, FAST = [1000, 980, 960], [900, 600, 300]


CLI = load_launcher("sample")


class Loaded(Exception):
    """The adapter's load was reached: every check before it passed."""


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    from fewstep.models import FlowModelAdapter

    def load(*a, **kw):
        raise Loaded()
    monkeypatch.setattr(FlowModelAdapter, "load", load)


def _export(root, method="flow", model_type="lora"):
    """A finished export as `phase_export.export_phase` leaves it: {name: folder} (Glance: glance-slow, glance-fast)."""
    from fewstep.config import load_config
    from fewstep.lora import write_run_info
    from fewstep.models.anystep import ANYSTEP_WEIGHTS_NAME

    options = dict(model_family="flux", pretrained_model_name_or_path="tiny:flux", output_dir=str(root),
                   model_type=model_type, method=method, use_ema=method == "twinflow")
    if method == "glance":
        options.update(glance_slow_timesteps=SLOW, glance_fast_timesteps=FAST)
    cfg = load_config(overrides=options)
    phases = {"glance-slow": SLOW, "glance-fast": FAST} if method == "glance" else {method: None}
    folders = {}
    for phase, timesteps in phases.items():
        out = os.path.join(str(root), phase) if method == "glance" else str(root)
        weights = os.path.join(out, "transformer") if model_type == "full" else out
        os.makedirs(weights, exist_ok=True)
        names = ["config.json", "diffusion_pytorch_model.safetensors"] if model_type == "full" else \
            ["pytorch_lora_weights.safetensors"]
        for name in names + ([ANYSTEP_WEIGHTS_NAME] if method == "twinflow" else []):
            open(os.path.join(weights, name), "wb").close()
        sigmas = [t / 1000 for t in timesteps] if timesteps else None
        write_run_info(out, cfg, {"sigmas": sigmas, "phase": phase, "step": 1, "resolution": 32})
        folders[phase] = out
    return folders


@pytest.fixture
def exports(tmp_path):
    made = {}

    def get(name):  # flow, twinflow, twinflow_full, glance
        if name not in made:
            method, _, full = name.partition("_")
            made[name] = _export(tmp_path / name, method, "full" if full else "lora")
        return dict(made[name])
    return get


def _main(capsys, *argv):
    """Run the CLI in-process; its one stderr line (exit status 2), or None if it got as far as loading the model."""
    try:
        rc = CLI.main(["--prompt", "x", "--device", "cpu", *map(str, argv)])
    except Loaded:
        return None
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fewstep: "), (rc, err)
    return err[0]


def _glance(exports, slow="glance-slow", fast="glance-fast"):
    g = exports("glance")
    return ["--method", "glance", "--slow", g[slow], "--fast", g[fast]]


def test_valid_exports_reach_the_model_load(exports, capsys, tmp_path):
    """The checks let every kind of export through (a Glance Slow LoRA alone is a flow-matching LoRA), and outputs
    in folders still to make, or beside a folder of the same stem (several step counts)."""
    (tmp_path / "a").mkdir()
    assert _main(capsys, "--method", "flow", "--lora", exports("flow")["flow"], "--steps", "1", "2", "--output",
                 tmp_path / "a.png") is None
    assert _main(capsys, "--method", "flow", "--lora", exports("flow")["flow"]) is None
    assert _main(capsys, "--method", "flow", "--lora", exports("glance")["glance-slow"]) is None
    assert _main(capsys, "--method", "twinflow", "--lora", exports("twinflow")["twinflow"]) is None
    assert _main(capsys, "--method", "twinflow", "--lora", exports("twinflow_full")["twinflow"]) is None
    assert _main(capsys, *_glance(exports), "--output", tmp_path / "new" / "folder" / "a.jpg") is None


@pytest.mark.parametrize("name, remove, message", [
    ("flow", "pytorch_lora_weights.safetensors", "records a LoRA export, but pytorch_lora_weights.safetensors is "
                                                 "missing"),
    ("twinflow", "pytorch_lora_weights.safetensors", "records a LoRA export, but pytorch_lora_weights.safetensors"),
    ("twinflow", "anystep_embeddings.safetensors", "holds no anystep_embeddings.safetensors"),
    ("twinflow_full", "transformer", "records a full fine-tune, but transformer/ holds no config.json"),
    ("twinflow_full", "transformer/diffusion_pytorch_model.safetensors", "records a full fine-tune"),
    ("twinflow_full", "transformer/anystep_embeddings.safetensors", "holds no anystep_embeddings.safetensors"),
    ("glance-slow", "pytorch_lora_weights.safetensors", "--slow "),
    ("glance-fast", "pytorch_lora_weights.safetensors", "--fast "),
])
def test_an_export_without_its_weights_is_refused(exports, capsys, name, remove, message):
    """It sampled the base model instead (the LoRA was loaded only if its file was there)."""
    import shutil

    if name.startswith("glance"):
        argv, folder = _glance(exports), exports("glance")[name]
    else:
        folder = next(iter(exports(name).values()))
        argv = ["--method", name.partition("_")[0], "--lora", folder]
    path = os.path.join(folder, remove)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    line = _main(capsys, *argv)
    assert line is not None and message in line and folder in line, line


@pytest.mark.parametrize("argv, option, message", [
    (lambda e: ["--method", "twinflow", "--lora", e("flow")["flow"]], "--lora",
     "--method twinflow: --lora {} is a flow export (method 'flow' in its fewstep_run.json); sample it with --method "
     "flow"),
    (lambda e: ["--method", "flow", "--lora", e("twinflow")["twinflow"]], "--lora", "{} is a twinflow export"),
    (lambda e: ["--method", "flow", "--lora", e("twinflow_full")["twinflow"]], "--lora", "{} is a twinflow export"),
    (lambda e: ["--method", "twinflow", "--lora", e("glance")["glance-fast"]], "--lora", "{} is a glance export"),
    (lambda e: ["--method", "glance", "--slow", e("flow")["flow"], "--fast", e("glance")["glance-fast"]], "--slow",
     "--method glance: --slow {} is a flow export"),
    (lambda e: _glance(e, slow="glance-fast", fast="glance-slow"), "--slow",
     "--slow {} is the run's glance-fast export; --slow takes its glance-slow export"),
    (lambda e: _glance(e, fast="glance-slow"), "--fast", "--fast {} is the run's glance-slow export"),
])
def test_the_method_must_be_the_runs(exports, capsys, argv, option, message):
    """Found before the load: a flow LoRA as TwinFlow failed after it, a TwinFlow export as flow skipped its any-step
    embeddings."""
    argv = argv(exports)
    line = _main(capsys, *argv)
    assert line is not None and message.format(argv[argv.index(option) + 1]) in line, line


@pytest.mark.parametrize("text, message", [
    ('{"config": {', "fewstep_run.json: not valid JSON"),
    ("[]", "fewstep_run.json: not a fewstep run info"),
    ('{"config": {"model_family": "fluxx"}}', "fewstep_run.json: unknown model family 'fluxx'"),
])
def test_a_corrupt_run_info_is_one_line(exports, capsys, text, message):
    """No traceback; the first case on the real command line, in a process of its own."""
    folder = exports("flow")["flow"]
    with open(os.path.join(folder, "fewstep_run.json"), "w") as fh:
        fh.write(text)
    if text == '{"config": {':
        proc = subprocess.run([PY, "launcher/sample.py", "--method", "flow", "--lora", folder, "--prompt", "x"],
                              cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, (proc.returncode, err)
        line = err[0]
    else:
        line = _main(capsys, "--method", "flow", "--lora", folder)
    assert line.startswith(f"fewstep: {folder}") and message in line, line


def test_missing_folders_say_so(exports, capsys, tmp_path):
    missing = tmp_path / "nowhere"
    expected = "does not exist: expected a fewstep output directory (a run's export)"
    assert _main(capsys, "--method", "flow", "--lora", missing) == f"fewstep: --lora {missing} {expected}"
    g = exports("glance")
    line = _main(capsys, "--method", "glance", "--slow", g["glance-slow"], "--fast", missing)
    assert line == f"fewstep: --fast {missing} {expected}"
    root = os.path.dirname(g["glance-slow"])  # the Glance run's output_dir: its exports are in the two subfolders
    line = _main(capsys, "--method", "flow", "--lora", root)
    assert "has no fewstep_run.json: a Glance run exports to its glance-slow/ and glance-fast/ folders" in line
    step = tmp_path / "run" / "checkpoints" / "step-3"  # a training checkpoint, not an export
    step.mkdir(parents=True)
    (step / "trainer.json").write_text("{}")
    line = _main(capsys, "--method", "flow", "--lora", step)
    assert f"has no fewstep_run.json: it is a training checkpoint; sample the run's export ({tmp_path / 'run'})" \
        in line, line
    (tmp_path / "run" / "glance-slow").mkdir()  # a Glance run's: its two exports
    line = _main(capsys, "--method", "flow", "--lora", step)
    assert f"sample the run's export ({tmp_path / 'run' / 'glance-slow'} and {tmp_path / 'run' / 'glance-fast'})" \
        in line, line


def test_a_base_model_of_another_family_names_the_option_that_fixes_it(exports, capsys, tmp_path):
    """sample.py has no model_family: it said "model_family is 'flux' ... or set model_family 'sd3'"."""
    flow = ["--method", "flow", "--lora", exports("flow")["flow"]]
    assert _main(capsys, *flow, "--model", "tiny:sd3") == \
        "fewstep: 'tiny:sd3' is a 'sd3' model, but the run trained a 'flux' model: use --model tiny:flux"
    line = _main(capsys, *flow, "--model", "tiny:fluxx")
    assert line.endswith("names no model family (fewstep has flux, qwen_image, sd3, sdxl), but the run trained a "
                         "'flux' model: use --model tiny:flux"), line
    sd3 = tmp_path / "sd3"  # a pipeline folder of another family: its transformer config names the class
    (sd3 / "transformer").mkdir(parents=True)
    (sd3 / "model_index.json").write_text("{}")
    (sd3 / "transformer" / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    assert _main(capsys, *flow, "--model", sd3) == (
        f"fewstep: '{sd3}' holds a SD3Transformer2DModel in transformer/, but the run's model family 'flux' samples "
        "with a FluxTransformer2DModel: give a flux model with --model")


@pytest.mark.parametrize("output, steps, message", [
    ("file.txt/a.png", [], "--output {tmp}/file.txt/a.png: {tmp}/file.txt is a file, not a folder"),
    ("file.txt/sub/a.png", ["1", "2"], "--output {tmp}/file.txt/sub/a.png: {tmp}/file.txt is a file, not a folder"),
    ("a.jpgg", [], "--output {tmp}/a.jpgg: PIL writes no '.jpgg' images (it writes "),
    ("a.jpgg", ["1", "2"], "--output {tmp}/a.jpgg: PIL writes no '.jpgg' images"),
    ("folder.png", ["1", "2"], "--output {tmp}/folder.png: {tmp}/folder-1.png is a folder, not a file"),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_load(exports, capsys, tmp_path, output, steps,
                                                                    message):
    """It failed after the load and the generation, when the image was saved."""
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "folder-1.png").mkdir()
    argv = ["--method", "flow", "--lora", exports("flow")["flow"], "--steps", *steps] if steps else _glance(exports)
    line = _main(capsys, *argv, "--output", tmp_path / output)
    assert line is not None and message.format(tmp=tmp_path) in line, line


@pytest.mark.parametrize("steps", [[], ["1", "2"]])
@pytest.mark.parametrize("output", ["folder", "folder/", "new/"])
def test_an_output_that_names_a_directory_is_refused_before_the_load(exports, capsys, tmp_path, output, steps):
    """An existing folder was saved as folder.png beside it; a name ending in a separator failed when the image was
    saved (PIL: unknown file extension)."""
    (tmp_path / "folder").mkdir()
    given = os.path.join(tmp_path, output)
    argv = ["--method", "flow", "--lora", exports("flow")["flow"], "--steps", *steps] if steps else _glance(exports)
    line = _main(capsys, *argv, "--output", given)
    name = os.path.join(given, "sample.png")
    assert line == f"fewstep: --output {given} is a directory: give a file name such as {name}", line
    assert not os.path.exists(tmp_path / "new")


def test_an_output_folder_that_cannot_be_created_is_refused_before_the_load(exports, capsys, tmp_path):
    """A folder on the way that is a link to nothing: the check climbed to an existing ancestor and passed, and
    creating the folder failed after the load and the generation (FileExistsError, a traceback)."""
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    line = _main(capsys, *_glance(exports), "--output", tmp_path / "dangling" / "a.png")
    assert line == f"fewstep: --output {tmp_path}/dangling/a.png: cannot create the folder {tmp_path}/dangling (a " \
                   "link to nothing)", line


def test_a_json_that_cannot_be_written_is_refused_before_the_load(exports, capsys, tmp_path):
    (tmp_path / "file.txt").write_text("")
    line = _main(capsys, *_glance(exports), "--output", tmp_path / "a.png", "--json", tmp_path / "file.txt" / "t.json")
    assert line == f"fewstep: --json {tmp_path}/file.txt/t.json: {tmp_path}/file.txt is a file, not a folder"


def test_output_paths():
    assert CLI.output_paths("a", [1]) == ["a.png"]  # saving to "a" failed: PIL had no format for it
    assert CLI.output_paths("a.jpg", [1]) == ["a.jpg"]
    assert CLI.output_paths("o/a.WEBP", [1, 2]) == ["o/a-1.WEBP", "o/a-2.WEBP"]
    assert CLI.output_paths("o/a", [1, 4]) == ["o/a-1.png", "o/a-4.png"]


def test_options_of_another_method_are_refused_by_name(exports, capsys):
    """A TwinFlow sampler option with --method flow or glance, --slow/--fast outside Glance, --lora with Glance, or a
    repeated step count: one line before any load (they were silently unused, or wrote one image twice)."""
    g, flow = exports("glance"), exports("flow")["flow"]
    line = _main(capsys, "--method", "flow", "--lora", flow, "--target-time", "few", "--gap-end", "0.1")
    assert line == "fewstep: --target-time, --gap-end not used by --method flow (--target-time: twinflow; " \
                   "--gap-end: twinflow)", line
    line = _main(capsys, "--method", "glance", "--slow", g["glance-slow"], "--fast", g["glance-fast"], "--lora", flow)
    assert "--lora not used by --method glance (--lora: twinflow and flow)" in line, line
    line = _main(capsys, "--method", "flow", "--lora", flow, "--slow", g["glance-slow"])
    assert "--slow not used by --method flow (--slow: glance)" in line, line
    line = _main(capsys, "--method", "flow", "--lora", flow, "--steps", "2", "2")
    assert line == "fewstep: --steps 2 2: a step count is given twice", line
