"""A preemption signal (SIGUSR1 from Slurm, SIGTERM) during model loading or engine set-up must not kill the task:
the handlers are installed at process start, the run exits 0 with a message, and a resume works. Ctrl-C (SIGINT)
stops with a checkpoint too, and twice at once."""
import glob
import os
import signal
import subprocess
import threading

from fewstep_testing import PY, REPO, cpu_env, read_metrics, write_config, write_dataset


# (signal, where rank 0 is signalled, what the exit line says, image latents cached when it stops)
RUNS = [(signal.SIGUSR1, "load", "before the first step", 2),  # the model load
        (signal.SIGTERM, "encode", "before the model loaded", 1),  # the cache fill's first batch: it ends after it
        (signal.SIGTERM, "probe", "before the model loaded", 0)]  # the scan's first image: it ends after it


def test_signal_during_model_load_exits_cleanly(tmp_path):
    """SIGUSR1 during the model load, SIGTERM during the cache fill's first batch (of one image) and SIGTERM during
    the data scan's first image read, each to its own run (side by side: single-process runs use one core each).
    The fill and the scan stop after that image: the model is never loaded, and the next start caches (or reads)
    only the other image."""
    runs = {}
    for sig, where, _, _ in RUNS:
        root = tmp_path / where
        root.mkdir()
        backend = write_dataset(str(root), n=2)
        cfg = write_config(str(root), backend, max_train_steps=2, resume_from_checkpoint="latest", vae_batch_size=1)
        proc = subprocess.Popen([PY, "launcher/train.py", "--config", cfg], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=cpu_env(FEWSTEP_TEST_DELAY=f"{where}:6"))
        runs[where] = root, cfg, proc

    def signal_while_loading(sig, where, proc):  # each run is signalled as soon as it reaches its place
        proc.captured = ""
        for line in proc.stdout:
            proc.captured += line
            if f"delayed 6 s at {where}" in line and "signalled" not in vars(proc):
                proc.signalled = True
                proc.send_signal(sig)

    watchers = [threading.Thread(target=signal_while_loading, args=(sig, where, runs[where][2]))
                for sig, where, _, _ in RUNS]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(timeout=300)
    for sig, where, line, cached in RUNS:
        root, _, proc = runs[where]
        _, err = proc.communicate(timeout=300)
        out = proc.captured
        assert proc.returncode == 0, (where, err[-3000:])
        assert f"preempted ({sig.name}) {line}; exiting" in out, out
        assert ("loading tiny:flux" in out) == (where == "load"), out
        assert ("data scan: read 2 new image(s)" in out) == (where != "probe"), out
        latents = glob.glob(str(root / "out" / "cache" / "**" / "latents" / "**" / "*.safetensors"), recursive=True)
        assert len(latents) == cached, (where, latents)
        assert "Traceback" not in err
    # nothing was trained, and the next (requeued) start trains normally; after the stopped scan it reads one image
    again = {where: subprocess.Popen([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for where, (_, cfg, _) in runs.items()}
    outs = {where: p.communicate(timeout=300)[0] for where, p in again.items()}
    assert [p.returncode for p in again.values()] == [0, 0, 0]
    assert "data scan: read 1 new image(s)" in outs["probe"], outs["probe"]
    assert "data scan: read" not in outs["encode"], outs["encode"]
    for root, _, _ in runs.values():
        assert [m["step"] for m in read_metrics(root / "out")] == [1, 2]


def test_ctrl_c_checkpoints_and_a_second_one_stops_at_once(tmp_path):
    """A first Ctrl-C (SIGINT) stops after the step with a checkpoint (one line, exit 130, never a traceback) and the
    run resumes from it; a second one stops at once, without a checkpoint, also in one line."""
    runs = {}
    for name, count in (("once", 1), ("twice", 2)):
        root = tmp_path / name
        root.mkdir()
        cfg = write_config(str(root), write_dataset(str(root), n=2), max_train_steps=4, checkpointing_steps=0,
                           resume_from_checkpoint="latest")
        runs[name] = root, cfg, subprocess.Popen(
            [PY, "launcher/train.py", "--config", cfg], cwd=REPO, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=cpu_env(FEWSTEP_FAULT_SIGNAL_AT_STEP=f"2:SIGINT:{count}"))
    results = {name: (root, cfg, *proc.communicate(timeout=300)) for name, (root, cfg, proc) in runs.items()}
    root, cfg, out, err = results["once"]
    assert runs["once"][2].returncode == 130, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith("fewstep:")] == [  # (the rest: progress bars)
        "fewstep: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: at once, without one)"], err
    assert "Traceback" not in err
    assert "preempted at step 2, checkpoint saved" in out and os.path.isdir(root / "out" / "checkpoints" / "step-2")
    resumed = subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(), text=True,
                             capture_output=True, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert [m["step"] for m in read_metrics(root / "out")] == [1, 2, 3, 4]
    root, cfg, out, err = results["twice"]
    assert runs["twice"][2].returncode == 130, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("fewstep:")]
    assert lines[-1].startswith("fewstep: interrupted (Ctrl-C twice): stopped at once, without a checkpoint") and \
        "Traceback" not in err, err
    assert not os.path.exists(root / "out" / "checkpoints")


def test_the_first_signal_names_the_stop_and_a_second_ctrl_c_raises():
    """torchrun's agent answers a terminal's Ctrl-C with SIGTERM to workers that got the SIGINT themselves: the stop
    stays a Ctrl-C (exit 130), and a second Ctrl-C after the SIGTERM still stops at once."""
    import pytest

    from fewstep import preemption

    preemption.clear()
    try:
        preemption._handler(signal.SIGINT, None)
        preemption._handler(signal.SIGTERM, None)
        assert preemption.requested() and preemption.received() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            preemption._handler(signal.SIGINT, None)
        preemption.clear()
        preemption._handler(signal.SIGUSR1, None)
        preemption._handler(signal.SIGTERM, None)
        assert preemption.received() == "SIGUSR1"
    finally:
        preemption.clear()
