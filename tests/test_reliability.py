"""Failure modes a user meets: one run per output dir, user mistakes as one clean line, and an interruption at a
Glance phase boundary that must not lose the Slow LoRA."""
import json
import os
import signal
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fewstep_testing import PY, REPO, cpu_env, read_metrics, side_by_side, write_config, write_dataset


def launch(cfg, **env):
    return subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(**env),
                           capture_output=True, text=True, timeout=600)


def one_clean_line(proc) -> str:
    """The run failed with exactly one `fewstep: ...` line on stderr, no traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("fewstep: "), proc.stderr[-3000:]
    return lines[0]


# ---- one run per output dir -----------------------------------------------------------------------------------------
def test_second_run_on_a_busy_output_dir_stops_naming_the_first_and_kill9_does_not_block_resume(tmp_path):
    backend = write_dataset(str(tmp_path), n=2)
    cfg = write_config(str(tmp_path), backend, max_train_steps=2, checkpointing_steps=1,
                       resume_from_checkpoint="latest")
    first = subprocess.Popen([PY, "launcher/train.py", "--config", cfg], cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=cpu_env(FEWSTEP_TEST_DELAY="load:600"))
    try:
        for line in first.stdout:  # the first run holds the directory while it "loads" (until it is killed below)
            if "delayed 600 s at load" in line:
                break
        t0 = time.monotonic()
        second = launch(cfg)
        line = one_clean_line(second)
        assert second.returncode == 2 and time.monotonic() - t0 < 60
        assert f"is in use by another fewstep run (PID {first.pid} on {socket.gethostname()}" in line, line
        assert not os.path.exists(tmp_path / "out" / "checkpoints")  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)  # kill -9: the kernel drops the flock with the process
        first.wait()
    third = launch(cfg)
    assert third.returncode == 0, third.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]
    # resumed at its end: says there is nothing left to train, before the data scan and the model load
    fourth = launch(cfg)
    assert fourth.returncode == 0 and "step 2 is the end of this run (2 steps): nothing left to train" in fourth.stdout
    assert "fewstep: loading" not in fourth.stdout and "caching" not in fourth.stdout  # nothing to do: nothing loaded
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]
    # a fresh run (no resume_from_checkpoint) into it is refused: its checkpoints would mix with the earlier run's
    os.makedirs(tmp_path / "fresh")
    fresh = write_config(str(tmp_path / "fresh"), backend, max_train_steps=2, checkpointing_steps=1,
                         output_dir=str(tmp_path / "out"))
    before = sorted(os.listdir(tmp_path / "out" / "checkpoints"))
    line = one_clean_line(launch(fresh))
    assert f"{tmp_path / 'out' / 'checkpoints'} holds an earlier run's checkpoints (step-1, step-2): continue that " \
           "run with resume_from_checkpoint latest" in line, line
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == before


HOLDER = """
import json, os, sys, time
from filelock import FileLock
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
lock = FileLock(os.path.join(out, ".fewstep.lock"))
lock.acquire()
json.dump({"host": "gpu-dead", "pid": 1, "slurm_job": "4242", "slurm_restart": 0, "started": "then"},
          open(os.path.join(out, ".fewstep-owner.json"), "w"))
print("held", flush=True)
time.sleep(float(sys.argv[2]))  # then the lock goes, as a dead node's does when its lease ends
"""


def test_a_damaged_checkpoint_file_is_named_and_latest_falls_back(tmp_path):
    """A checkpoint file damaged after its save: an unreadable one ends a resume from it in one line naming the
    checkpoint and the earlier one to resume from; an emptied one counts as missing, so `latest` falls back to the
    previous checkpoint (one warning line) and the run continues from there."""
    backend = write_dataset(str(tmp_path), n=2)
    cfg = write_config(str(tmp_path), backend, max_train_steps=2, checkpointing_steps=1)
    assert launch(cfg).returncode == 0
    rank0 = tmp_path / "out" / "checkpoints" / "step-2" / "rank0.pt"

    def resume(spec):
        return subprocess.run([PY, "launcher/train.py", "--config", cfg, "--resume_from_checkpoint", spec,
                               "--max_train_steps", "3"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                              timeout=600)  # one step more: a resume at the end would load nothing

    rank0.write_bytes(b"not a checkpoint" * 64)
    proc = resume("step-2")
    line = one_clean_line(proc)
    assert proc.returncode == 2 and "checkpoint" in line and "step-2" in line and "cannot be read" in line, line
    assert f"resume_from_checkpoint {tmp_path / 'out' / 'checkpoints' / 'step-1'}; also none" in line, line
    rank0.write_bytes(b"")
    proc = resume("latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank0.pt (empty)" in proc.stdout + proc.stderr and "resumed from" in proc.stdout, proc.stdout[-2000:]
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3]


def test_a_filesystem_without_flock_runs_unguarded_and_blocks_no_later_run(tmp_path, monkeypatch, capsys):
    """Where flock is missing (Lustre mounted noflock), a marker-file lock would outlive a SIGKILLed run and refuse
    every later one, its requeue included: the run goes on without the guard, says so, and leaves nothing behind."""
    import errno
    import fcntl

    from fewstep import run_dir

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock, problem = run_dir._acquire(str(tmp_path / "out"))
    assert (lock, problem) == (None, None)
    assert "running without the one-run-per-directory guard" in capsys.readouterr().out
    assert run_dir._acquire(str(tmp_path / "out")) == (None, None)  # nothing left behind refuses the next run


def test_requeued_job_waits_for_the_lock_of_its_own_dead_node(tmp_path):
    """A Slurm job requeued after a node failure restarts with its job id (and a higher restart count) while the dead
    node's lock may linger on the shared filesystem: rank 0 waits for it (naming it), and then trains, instead of
    ending the job as busy. A second run in the same run of the job (two steps of one allocation) is busy at once."""
    backend = write_dataset(str(tmp_path), n=2)
    cfg = write_config(str(tmp_path), backend, max_train_steps=2)
    holder = subprocess.Popen([PY, "-c", HOLDER, str(tmp_path / "out"), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        same = launch(cfg, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0", FEWSTEP_REQUEUE_LOCK_WAIT="600")
        assert same.returncode == 2 and "is in use by another fewstep run (PID 1 on gpu-dead" in one_clean_line(same)
        run = subprocess.Popen([PY, "launcher/train.py", "--config", cfg], cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=cpu_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1",
                                                                   FEWSTEP_REQUEUE_LOCK_WAIT="20"))
        waiting = next((line for line in run.stdout if "still locked" in line), "")
        assert "by this Slurm job's run before its requeue (PID 1 on gpu-dead, Slurm job 4242" in waiting, waiting
    finally:
        holder.kill()  # the dead node's lease ends
        holder.wait()
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]


# ---- user mistakes: one line, exit 2 -------------------------------------------------------------------------------
MISTAKES = ["unknown-key", "output-dir-is-a-file", "offline-hub-id", "caption-without-image", "missing-model-dir",
            "unset-variable", "cache-dir-under-a-file", "logging-dir-under-a-file", "empty-output-dir",
            "data-typo-before-model", "lora-target-typo"]


def mistaken_config(root, case) -> tuple[str, str]:
    """A config with the mistake `case` under `root` (its own folder), and what the one line must say."""
    backend = write_dataset(str(root), n=2)
    overrides, expect = {}, ""
    if case == "unknown-key":
        overrides, expect = {"lora_rnk": 4}, "unknown config key 'lora_rnk' in "
    elif case == "output-dir-is-a-file":
        (root / "afile").write_text("x")
        overrides, expect = {"output_dir": str(root / "afile")}, "exists and is not a directory"
    elif case == "offline-hub-id":  # HF_HUB_OFFLINE=1
        overrides = {"pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev"}
        expect = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    elif case == "caption-without-image":
        (root / "images" / "orphan.txt").write_text("a caption")
        expect = "caption without an image: "
    elif case == "unset-variable":  # e.g. $SLURM_TMPDIR off the site that sets it: not a folder named '$SLURM_TMPDIR'
        overrides = {"cache_dir": "$FEWSTEP_UNSET_DIR/cache"}
        expect = "cache_dir '$FEWSTEP_UNSET_DIR/cache': environment variable FEWSTEP_UNSET_DIR is not set"
    elif case in ("cache-dir-under-a-file", "logging-dir-under-a-file"):  # found before the data scan and model load
        (root / "afile").write_text("x")
        key = case.split("-under")[0].replace("-", "_")
        overrides, expect = {key: str(root / "afile" / "sub")}, f"cannot create {key} "
    elif case == "data-typo-before-model":  # reported before the hub id is resolved (a download, if not cached)
        with open(backend) as fh:
            entries = json.load(fh)
        entries[0]["caption_extention"] = ".txt"
        with open(backend, "w") as fh:
            json.dump(entries, fh)
        overrides, expect = {"pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev"}, "'caption_extention'"
    elif case == "lora-target-typo":  # checked on the meta-device architecture: before the cache fill and the load
        overrides = {"lora_targets": ["to_qq", "to_k"]}
        expect = "lora_targets: no module of FluxTransformer2DModel is named 'to_qq' (did you mean 'to_q'?)"
    elif case == "empty-output-dir":
        overrides, expect = {"output_dir": ""}, "'output_dir' is empty: give a path"
    else:
        overrides, expect = {"pretrained_model_name_or_path": str(root / "nowhere")}, "does not exist"
    return write_config(str(root), backend, **overrides), expect


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """Every case's config through launcher/train.py's main, in one process started from the repo root (offline, as
    CI is): {case: (result, expected line)}."""
    root = tmp_path_factory.mktemp("mistakes")
    configs, expected = {}, {}
    for case in MISTAKES:
        (root / case).mkdir()
        configs[case], expected[case] = mistaken_config(root / case, case)
    proc = subprocess.run([PY, "tests/user_mistakes_worker.py", json.dumps(configs), str(root / "results.json")],
                          cwd=REPO, env=cpu_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return {case: (results[case], expected[case]) for case in MISTAKES}


@pytest.mark.parametrize("case", MISTAKES)
def test_user_mistakes_end_in_one_clean_line(mistakes, case):
    result, expect = mistakes[case]
    line = one_clean_line(SimpleNamespace(returncode=result["status"], stderr=result["stderr"]))
    assert result["status"] == 2 and expect in line, line
    assert "fewstep: loading" not in result["stdout"]  # before the model load
    assert "caching" not in result["stdout"]  # and before the cache fill (VAE and text encoders over the data)
    assert not os.path.exists(os.path.join(REPO, "$FEWSTEP_UNSET_DIR"))  # nothing written under the literal name


def test_no_config_at_all_says_so():
    proc = subprocess.run([PY, "launcher/train.py"], cwd=REPO, capture_output=True, text=True, env=cpu_env(),
                          timeout=120)
    assert proc.returncode == 2 and "--config PATH is required" in one_clean_line(proc)
    proc = subprocess.run([PY, "launcher/train.py", "--config", "a.json", "--config=b.json"], cwd=REPO,
                          capture_output=True, text=True, env=cpu_env(), timeout=120)
    assert proc.returncode == 2 and "--config is given twice (a.json and b.json)" in one_clean_line(proc)


def test_an_unexpected_error_shows_its_traceback_and_leaves_through_the_failure_exit():
    """An error that is no user's mistake (a bug, CUDA out of memory) prints its traceback and exits 1 through the
    same exit as a mistake (where rank 0 leaves last: `distributed.leave_after_failure`), not through the
    interpreter's."""
    script = ("import runpy, sys, fewstep.trainer as t, fewstep.engine.distributed as d\n"
              "def boom(cfg): raise RuntimeError('boom')\n"
              "t.train = boom\n"
              "d.leave_after_failure = lambda: print('left after failure', flush=True)\n"
              "sys.argv = ['launcher/train.py', '--config', sys.argv[1]]\n"
              "runpy.run_path('launcher/train.py', run_name='__main__')\n")
    proc = subprocess.run([PY, "-c", script, "configs/demo/flow.json"], cwd=REPO, capture_output=True, text=True,
                          env=cpu_env(), timeout=120)
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr and "Traceback" in proc.stderr, proc.stderr
    assert "left after failure" in proc.stdout


def test_debug_shows_the_traceback(tmp_path):
    backend = write_dataset(str(tmp_path), n=2)
    proc = launch(write_config(str(tmp_path), backend, lora_rnk=4), FEWSTEP_DEBUG="1")
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr


# ---- Glance phase boundary -----------------------------------------------------------------------------------------
GLANCE = dict(method="glance", glance_slow_timesteps="0.9,0.8", glance_fast_timesteps="0.4,0.1", max_train_steps=6,
              checkpointing_steps=3, use_ema=True, ema_decay=0.9, resume_from_checkpoint="latest", train_batch_size=1)


def _phase_files(out, phase):
    d = out / phase
    weights = {f: load_file(d / f) for f in ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors")}
    info = json.loads((d / "fewstep_run.json").read_text())
    return weights, {k: info[k] for k in ("phase", "step", "sigmas", "resolution")}


def test_a_failed_final_export_loses_no_training(tmp_path):
    """The last step's checkpoint is written before the export: an export that fails (a full disk, an out-of-memory
    gather, a kill) is redone on resume without retraining. It was written after, so with checkpointing_steps 0
    the whole run was lost."""
    backend = write_dataset(str(tmp_path), n=2)
    cfg = write_config(str(tmp_path), backend, max_train_steps=3, checkpointing_steps=0, validation_steps=0,
                       resume_from_checkpoint="latest", cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out"
    (out / "pytorch_lora_weights.safetensors").mkdir(parents=True)  # the export cannot write its file
    first = launch(cfg)
    assert first.returncode != 0 and (out / "checkpoints" / "step-3" / "trainer.json").exists(), first.stderr[-2000:]
    (out / "pytorch_lora_weights.safetensors").rmdir()
    resumed = launch(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished at step 3 but not exported (interrupted); exporting" in resumed.stdout
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]  # nothing trained again
    assert load_file(out / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("interruption", ["crash", "preempt"])
def test_interruption_at_the_glance_phase_boundary_keeps_the_slow_export(tmp_path, interruption):
    """Interrupted right after the Slow phase's last step (checkpoint at step 6 written, Slow not yet exported), then
    resumed: glance-slow/ is exported on resume and equals the uninterrupted run's, and Fast continues exactly."""
    backend = write_dataset(str(tmp_path), n=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight_cfg = write_config(str(tmp_path / "a"), backend, output_dir=str(tmp_path / "a" / "out"),
                                cache_dir=str(tmp_path / "cache"), **GLANCE)
    cfg = write_config(str(tmp_path / "b"), backend, output_dir=str(tmp_path / "b" / "out"),
                       cache_dir=str(tmp_path / "cache"), **GLANCE)
    fault = {"FEWSTEP_FAULT_AFTER_STEP": "6"} if interruption == "crash" else {"FEWSTEP_FAULT_SIGNAL_AT_STEP": "6"}
    straight, first = side_by_side(lambda: launch(straight_cfg), lambda: launch(cfg, **fault))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert first.returncode == (17 if interruption == "crash" else 0), first.stderr[-3000:]
    b = tmp_path / "b" / "out"
    assert not (b / "glance-slow" / "fewstep_run.json").exists()  # interrupted before the Slow export
    resumed = launch(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "glance-slow: finished at step 6 but not exported (interrupted); exporting" in resumed.stdout
    a = tmp_path / "a" / "out"
    for phase in ("glance-slow", "glance-fast"):
        (wa, ia), (wb, ib) = _phase_files(a, phase), _phase_files(b, phase)
        assert ia == ib
        for f in wa:
            assert wa[f].keys() == wb[f].keys() and all(torch.equal(wa[f][k], wb[f][k]) for k in wa[f]), (phase, f)
    assert [m["loss"] for m in read_metrics(a)] == [m["loss"] for m in read_metrics(b)]
