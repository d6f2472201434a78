"""A preemption signal (SIGUSR1 from Slurm, SIGTERM) during model loading or engine set-up must not kill the task:
the handlers are installed at process start, the run exits 0 with a message, and a resume works."""
import signal
import subprocess
import time

import pytest

from fewstep_testing import PY, REPO, cpu_env, read_metrics, write_config, write_dataset


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_during_model_load_exits_cleanly(tmp_path, sig):
    backend = write_dataset(str(tmp_path), n=2)
    cfg = write_config(str(tmp_path), backend, max_train_steps=2, resume_from_checkpoint="latest")
    proc = subprocess.Popen([PY, "launcher/train.py", "--config", cfg], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cpu_env(FEWSTEP_TEST_DELAY="load:6"))
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # wait until the model is being loaded
        if "delayed 6 s at load" in line:
            break
        assert time.monotonic() < deadline
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"preempted ({sig.name}) before the first step" in out, out
    assert "Traceback" not in err
    # nothing was trained, and the next (requeued) start trains normally
    subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(), check=True,
                   capture_output=True, timeout=300)
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]
