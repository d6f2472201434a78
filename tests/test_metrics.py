"""Weights & Biases logging (`report_to: wandb` / `all`) in offline mode, read back from the run's own `.wandb`
transaction log with wandb's protobuf records; no mocks."""
import glob
import json
import os
import struct
import subprocess
import time

import numpy as np
import pytest

from fewstep.config import ConfigError, load_config
from fewstep.metrics import MetricsLogger, trackers
from fewstep_testing import PY, REPO, cpu_env, read_metrics, write_config, write_dataset

pytest.importorskip("wandb")


def wandb_records(run_dir: str) -> list:
    """Every record of an offline run's `run-<id>.wandb` file: wandb's datastore format (a 7-byte ':W&B' header,
    then LevelDB-log blocks of 32 KiB whose chunks carry serialized `wandb_internal_pb2.Record`s)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending, chunks = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            chunks.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(chunk)
        records.append(rec)
    return records


def history(records) -> dict[int, dict]:
    """{step: {key: value}} merged over the run's history records (a logged image is a dict of its fields)."""
    out = {}
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row = out.setdefault(rec.history.step.num, {})
        for item in rec.history.item:
            *parents, leaf = [item.key] if item.key else list(item.nested_key)
            node = row
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = json.loads(item.value_json)
    return out


def offline_runs(wandb_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")))


def run_id(run_dir: str) -> str:
    """The W&B run id in an offline folder's name, `offline-run-<date>_<time>-<id>`; wandb appends `-1`, `-2`, ...
    to a second start of the same run within the same second (the ids were read as `1`: a flaky count)."""
    return os.path.basename(run_dir).split("-")[3]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    return str(wandb_dir)


def test_report_to_values():
    assert trackers("all") == trackers("tensorboard,wandb") == {"tensorboard", "wandb"}
    assert trackers("none") == set() and trackers("wandb") == {"wandb"}
    base = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux"}
    assert load_config(None, {**base, "report_to": "wandb", "tracker_project_name": "p"}).tracker_project_name == "p"
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, {**base, "report_to": "comet_ml"})


def test_logger_writes_scalars_images_and_resumes_the_same_run(tmp_path, offline):
    out = str(tmp_path / "run")
    init = {"project": "fewstep-test", "name": "unit", "config": {"seed": 3}}
    logger = MetricsLogger(out, None, True, False, total_steps=3, start_step=0, wandb_init=init)
    for step in (1, 2):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1}, samples=2)
    scatter = np.zeros((8, 8, 3), np.uint8)
    logger.image("twinflow/trajectories (|t| vs tt, red = negative time)", scatter, 2)
    logger.close()
    logger = MetricsLogger(out, None, True, False, total_steps=3, start_step=2, wandb_init=init)  # a resume
    logger.log(3, {"loss": 0.25, "lr": 0.1}, samples=2)
    logger.close()
    first, second = offline_runs(offline)
    run_ids = {run_id(r) for r in (first, second)}
    assert len(run_ids) == 1  # the resumed process continued the same W&B run
    rows = history(wandb_records(first))
    assert [rows[s]["train/loss"] for s in (1, 2)] == [1.0, 0.5]
    image = rows[2]["twinflow/trajectories (|t| vs tt, red = negative time)"]
    assert image["_type"] == "image-file" and "experimental/theory unverified" in image["caption"]
    assert os.path.exists(os.path.join(first, "files", image["path"]))
    assert history(wandb_records(second))[3]["train/loss"] == 0.25
    (run,) = [r.run for r in wandb_records(first) if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("fewstep-test", "unit")
    assert not os.path.exists(os.path.join(out, "logs", "events.out.tfevents"))  # no TensorBoard asked for


def test_steps_logged_again_after_a_resume_go_to_a_new_wandb_run(tmp_path, offline):
    """Resumed from an earlier step than the run had logged (a crash after its checkpoint, or a rollback), the steps
    logged again would be dropped by the resumed W&B run (it keeps the first value at each step): they go to a new
    run, '<name>-from-<step>'. A crash leaves no later checkpoint, so metrics.jsonl is what tells (the trainer once
    asked the checkpoints folder, and a crashed run's re-logged steps kept their old values in W&B)."""
    from fewstep.config import load_config as load

    out = str(tmp_path / "run")
    cfg = load(None, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", "output_dir": out,
                      "report_to": "wandb", "tracker_project_name": "fewstep-test", "tracker_run_name": "unit"})
    first = MetricsLogger.from_config(cfg, True, 6, 0)
    for step in (1, 2, 3, 4):
        first.log(step, {"loss": 1.0}, samples=1)
    first.close()
    again = MetricsLogger.from_config(cfg, True, 6, 2)  # steps 3 and 4 had been logged
    again.log(3, {"loss": 0.5}, samples=1)
    again.close()
    requeued = MetricsLogger.from_config(cfg, True, 6, 3)  # a plain resume of that run keeps its id and its name
    requeued.log(4, {"loss": 0.25}, samples=1)
    requeued.close()
    runs = offline_runs(offline)
    assert len({run_id(r) for r in runs}) == 2  # two W&B runs
    names = [[r.run for r in wandb_records(d) if r.WhichOneof("record_type") == "run"][0].display_name for d in runs]
    assert sorted(names) == ["unit", "unit-from-2", "unit-from-2"]
    second = [d for d, name in zip(runs, names) if name == "unit-from-2"][0]
    assert history(wandb_records(second))[3]["train/loss"] == 0.5
    restarted = MetricsLogger.from_config(cfg, True, 6, 0)  # a fresh start over an old metrics.jsonl: its own name
    restarted.close()
    latest = [d for d in offline_runs(offline) if d not in runs]
    assert [[r.run for r in wandb_records(d) if r.WhichOneof("record_type") == "run"][0].display_name
            for d in latest] == ["unit"]


def test_trainer_reports_to_wandb_offline_beside_tensorboard(tmp_path):
    """`report_to: all` through launcher/train.py: the offline W&B run holds every logged scalar of every step
    (the values of metrics.jsonl) and the validation image; TensorBoard is written as before."""
    backend = write_dataset(str(tmp_path), n=2)
    out = str(tmp_path / "out")
    cfg = write_config(str(tmp_path), backend, output_dir=out, max_train_steps=3, validation_steps=2,
                       report_to="all", tracker_project_name="fewstep-ci", tracker_run_name="tiny-flux")
    wandb_dir = str(tmp_path / "wandb-dir")
    os.makedirs(wandb_dir)
    proc = subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, capture_output=True, text=True,
                          env=cpu_env(WANDB_MODE="offline", WANDB_DIR=wandb_dir, WANDB_SILENT="true"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (run_dir,) = offline_runs(wandb_dir)
    records = wandb_records(run_dir)
    rows = history(records)
    logged = read_metrics(out)
    assert sorted(rows) == [m["step"] for m in logged] == [1, 2, 3]
    for m in logged:
        for k, v in m.items():
            if k != "step":
                assert rows[m["step"]][f"train/{k}"] == pytest.approx(v, rel=1e-12), (m["step"], k)
    assert rows[2]["validation/flow"]["_type"] == "image-file"
    assert rows[3]["validation/flow"]["_type"] == "image-file"  # the final validation, at the last step
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("fewstep-ci", "tiny-flux")
    assert glob.glob(os.path.join(out, "logs", "events.out.tfevents.*"))


def _without_wandb_credentials(tmp_path, **extra):
    """The environment of a machine where nobody ran `wandb login`: no key, no netrc, no W&B settings files."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in cpu_env().items() if not k.startswith("WANDB_") and k not in ("NETRC",)}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), WANDB_CONFIG_DIR=str(home / "wandb-config"),
               WANDB_SILENT="true", **extra)
    return env


def test_online_wandb_without_credentials_stops_before_any_compute(tmp_path):
    """Online W&B on a machine without credentials: one `fewstep:` line and exit 2 before the data scan and the
    model load (wandb.init comes after both, minutes into a large run)."""
    backend = write_dataset(str(tmp_path), n=2)
    out = str(tmp_path / "out")
    cfg = write_config(str(tmp_path), backend, output_dir=out, report_to="wandb", cache_dir=str(tmp_path / "cache"))
    proc = subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, capture_output=True, text=True,
                          env=_without_wandb_credentials(tmp_path), timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("fewstep:")]
    assert len(errors) == 1 and "no W&B credentials" in errors[0] and "WANDB_MODE=offline" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "fewstep: loading" not in proc.stdout and not os.path.exists(os.path.join(out, "data_index"))
    assert not os.listdir(tmp_path / "cache")  # created with the output directory, and nothing in it


@pytest.mark.parametrize("extra, refused", [({"WANDB_MODE": "offline"}, None), ({"WANDB_MODE": "disabled"}, None),
                                            ({}, "no W&B credentials"),
                                            ({"WANDB_API_KEY": "tooshort"}, "WANDB_API_KEY invalid")])
def test_wandb_credentials_check_follows_the_mode(tmp_path, extra, refused):
    """Offline and disabled W&B need no credentials; online needs a well-formed key (a fresh process each: wandb
    reads its mode once per process)."""
    code = ("from fewstep.errors import UserError\nfrom fewstep.metrics import require_wandb_credentials\n"
            "try:\n    require_wandb_credentials('tensorboard,wandb')\n    print('ACCEPTED')\n"
            "except UserError as e:\n    print('REFUSED', e)\n")
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_without_wandb_credentials(tmp_path, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if refused is None:
        assert "ACCEPTED" in proc.stdout, proc.stdout
    else:
        assert "REFUSED" in proc.stdout and refused in proc.stdout, proc.stdout


def test_resume_logs_every_step_once_in_tensorboard_and_jsonl(tmp_path):
    """A run logs steps 1-5 and dies (its last JSONL line cut short); the resume from step 3 logs 4-6 again. TensorBoard
    and metrics.jsonl then hold steps 1-6 once each, 4 and 5 with the resumed run's values; the replaced lines (4, 5)
    are kept beside it, and a second resume from step 3 keeps its own in a second file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "run")
    first = MetricsLogger(out, None, True, True, total_steps=6, start_step=0)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)}, samples=1)
    first.close()
    with open(os.path.join(out, "logs", "metrics.jsonl"), "a") as fh:
        fh.write('{"step": 6, "lo')  # the line a full disk or a kill cut short
    resumed = MetricsLogger(out, None, True, True, total_steps=6, start_step=3)
    for step in range(4, 7):
        resumed.log(step, {"loss": 10.0 + step}, samples=1)
    resumed.close()
    acc = EventAccumulator(os.path.join(out, "logs"))
    acc.Reload()
    scalars = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    assert scalars == expected
    assert [(m["step"], m["loss"]) for m in read_metrics(out)] == expected

    def rows(name):
        with open(os.path.join(out, "logs", name)) as fh:
            return [(r["step"], r["loss"]) for r in map(json.loads, fh)]

    assert rows("metrics.replaced-after-step-3.jsonl") == [(4, 4.0), (5, 5.0)]
    MetricsLogger(out, None, True, False, total_steps=6, start_step=3).close()  # a rollback to step 3 again
    assert rows("metrics.replaced-after-step-3.jsonl") == [(4, 4.0), (5, 5.0)]
    assert rows("metrics.replaced-after-step-3.1.jsonl") == [(4, 14.0), (5, 15.0), (6, 16.0)]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    # an attempt that died before its first checkpoint, started again from step 0: TensorBoard holds the new curve
    # only (it kept both, one over the other)
    again = MetricsLogger(out, None, True, True, total_steps=6, start_step=0)
    for step in (1, 2):
        again.log(step, {"loss": 20.0 + step}, samples=1)
    again.close()
    acc = EventAccumulator(os.path.join(out, "logs"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 21.0), (2, 22.0)]


def test_samples_per_s_counts_the_step_not_a_save_or_validation_before_it(tmp_path):
    """The trainer restarts the clock after a checkpoint or validation: the next step's rate is its own (it counted
    the pause too, a dip at every checkpointing_steps)."""
    logger = MetricsLogger(str(tmp_path), None, True, False, total_steps=2, start_step=0)
    logger.log(1, {"loss": 1.0}, samples=1)
    time.sleep(1.0)  # a validation or checkpoint
    logger.restart_clock()
    logger.log(2, {"loss": 1.0}, samples=1)
    logger.close()
    assert read_metrics(str(tmp_path))[1]["samples_per_s"] > 2  # 1 sample in well under the pause's second


def test_the_logged_lr_is_the_rate_the_step_trained_at(tmp_path):
    """Each step logs the learning rate its optimizer step used (it logged the next step's). Adam's first update of
    a weight is lr x sign(gradient) (m / sqrt(v) = +-1), so the trained LoRA B (zero before the step; its scale
    alpha / rank is 1 here) holds values of size exactly the rate step 1 used: in warm-up, below the one step 2
    uses."""
    from safetensors.torch import load_file

    backend = write_dataset(str(tmp_path), n=2)
    cfg = write_config(str(tmp_path), backend, max_train_steps=1, lr_scheduler="constant", lr_warmup_steps=2,
                       adam_weight_decay=0.0, lora_alpha=4)
    proc = subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = read_metrics(tmp_path / "out")[0]["lr"]
    lora = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    trained = max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k)
    assert 0 < logged < 1e-3 and trained == pytest.approx(logged, rel=1e-3), (logged, trained)
