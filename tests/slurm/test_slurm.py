"""slurm/*.sbatch on a real local Slurm 22.05 cluster (two fake nodes), in CPU test mode, with the real trainer.

Order matters for speed, not correctness: the fast launch-logic tests run first; the `trainer_jobs` fixture then
submits every trainer job at once (Glance on one node, a reference TwinFlow run and a TwinFlow run that gets
preempted on both nodes, and a sampling job that waits for the reference run), and the preemption test runs first
among them so that it can signal its job while that is still training.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
TWINFLOW_STEPS = 16      # enough optimizer steps (~1 s each here) that USR1 after step 3 lands mid-run
JOB_TIMEOUT = 420        # seconds; a 2-core CI machine shared with other work can be slow
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}
BOTH_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]


def _read_metrics(out_dir):
    path = Path(out_dir) / "logs" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log(workdir, job):
    """The job's %x-%j.out (all runs of a requeued job are appended to it), progress-bar redraws split into lines."""
    path = Path(workdir) / f"{job['JobName']}-{job['JobId']}.out"
    return path.read_text(errors="replace").replace("\r", "\n") if path.exists() else f"<no {path}>"


def _assert_ok(cluster, jobid, workdir, timeout=JOB_TIMEOUT):
    job = cluster.wait_finished(jobid, timeout)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n--- job log ---\n{_log(workdir, job)}"
    return job


def _env(**extra):
    """The job environment: this checkout and interpreter; the job script alone decides DS_ACCELERATOR and threads."""
    return {"FEWSTEP_ROOT": str(REPO), "FEWSTEP_PYTHON": sys.executable, "FEWSTEP_CPU": None,
            "DS_ACCELERATOR": None, "OMP_NUM_THREADS": None, **extra}


# ---- static checks -------------------------------------------------------------------------------------------------
def test_shellcheck_clean():
    """`shellcheck -S warning slurm/*` (and following `source` into common.sh) reports nothing."""
    if shutil.which("shellcheck") is None:
        from cluster import why_unavailable  # installs shellcheck with the Slurm packages when root + apt
        reason = why_unavailable()
        if reason is not None or shutil.which("shellcheck") is None:
            pytest.skip(f"shellcheck not installed ({reason})")
    scripts = sorted(str(p.relative_to(REPO)) for p in SLURM.iterdir())
    assert {"slurm/common.sh", "slurm/glance.sbatch", "slurm/twinflow.sbatch", "slurm/sample.sbatch"} <= set(scripts)
    r = subprocess.run(["shellcheck", "-x", "-S", "warning", *scripts], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", ["glance.sbatch", "twinflow.sbatch", "sample.sbatch"])
def test_unedited_headers_accepted(slurm_cluster, tmp_path, script):
    """Slurm 22.05 accepts every #SBATCH line as shipped (8-GPU fake nodes): `sbatch --test-only` schedules it."""
    r = slurm_cluster.cmd("sbatch", "--test-only", str(SLURM / script), env=_env(), cwd=tmp_path, check=False)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr


# ---- launch logic, with a stand-in for the interpreter -------------------------------------------------------------
PROBE = """#!/bin/bash
# Stands in for the Python interpreter: records each task's launch environment into the --output_dir it is given.
out=""
while [ $# -gt 0 ]; do [ "$1" = --output_dir ] && out=$2; shift; done
mkdir -p "$out"
# Like the trainer: TERM/USR1 end the task as a checkpointed preemption (exit $FEWSTEP_PREEMPTED_EXIT; PROBE_TRAP_EXIT
# instead: a run that failed or finished then). PROBE_SLEEP keeps it running until then; on either signal it takes
# PROBE_TERM_DELAY seconds (a checkpoint) and then leaves term-<rank> or usr1-<rank> behind. The traps are set
# before the env file, which tells the tests that the task is up.
stop=${PROBE_TRAP_EXIT:-${FEWSTEP_PREEMPTED_EXIT:-0}}
# A trap ignores further signals first, as the trainer's handler only sets a flag: srun's TERM to the other task
# when one leaves with 75 must not cut a checkpoint short.
trap 'trap "" TERM USR1; sleep "${PROBE_TERM_DELAY:-0}"; touch "$out/term-$RANK"; exit "$stop"' TERM
trap 'trap "" TERM USR1; sleep "${PROBE_TERM_DELAY:-0}"; touch "$out/usr1-$RANK"; exit "$stop"' USR1
env | grep -E '^(RANK|LOCAL_RANK|WORLD_SIZE|MASTER_ADDR|MASTER_PORT|CUDA_VISIBLE_DEVICES|SLURMD_NODENAME|DS_ACCELERATOR|OMP_NUM_THREADS)=' > "$out/rank-$RANK.env.tmp"
mv "$out/rank-$RANK.env.tmp" "$out/rank-$RANK.env"
# PROBE_WAIT_ALL: wait until every task is up (as the trainer's rendezvous does), so that no task is still starting,
# and dies of srun's TERM instead of trapping it, when another exits
if [ -n "${PROBE_WAIT_ALL:-}" ]; then
    until [ "$(find "$out" -name 'rank-*.env' | wc -l)" -ge "$WORLD_SIZE" ]; do sleep 0.1; done
fi
sleep "${PROBE_SLEEP:-0}" &
wait
exit "${PROBE_EXIT:-0}"
"""


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe-python"
    path.write_text(PROBE)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _task_envs(out_dir):
    envs = {}
    for f in Path(out_dir).glob("rank-*.env"):
        env = dict(line.split("=", 1) for line in f.read_text().splitlines())
        envs[int(env["RANK"])] = env
    return envs


@pytest.mark.parametrize("cpu_mode", [False, True], ids=["gpu-mode", "cpu-mode"])
def test_one_task_per_gpu_rank_layout(slurm_cluster, tmp_path, probe, cpu_mode):
    """2 nodes x 2 (fake) GPUs: ranks 0-3 in node order, LOCAL_RANK per node, rendezvous at the first node.

    GPU mode: every task sees all GPUs of its node (the trainer picks cuda:LOCAL_RANK). CPU mode: the step gets no GPU
    GRES although the job has some, and DeepSpeed is told to use its CPU accelerator.
    """
    out = tmp_path / "out"
    env = _env(FEWSTEP_PYTHON=str(probe), FEWSTEP_OUTPUT_DIR=str(out), **({"FEWSTEP_CPU": "1"} if cpu_mode else {}))
    # Submitted as on a site whose default is not --export=ALL: the batch shell gets the named variables, and its
    # job steps would get only these too (SLURM_EXPORT_ENV) unless the srun passes its own environment on.
    export = ",".join([k for k, v in env.items() if v is not None] + ["PATH", "SLURM_CONF"])
    jobid = slurm_cluster.sbatch(SLURM / "twinflow.sbatch", options=["--nodes=2", "--ntasks-per-node=2",
                                 "--gpus-per-node=2", "--cpus-per-task=1", f"--export={export}"], env=env,
                                 cwd=tmp_path)
    job = _assert_ok(slurm_cluster, jobid, tmp_path, timeout=60)
    envs = _task_envs(out)
    assert sorted(envs) == [0, 1, 2, 3], _log(tmp_path, job)
    for rank, e in envs.items():
        assert e["WORLD_SIZE"] == "4" and e["MASTER_ADDR"] == "127.0.0.1"  # n1's NodeAddr (its name need not resolve)
        assert e["MASTER_PORT"] == str(10000 + jobid % 20000)  # fixed per job id, below the ephemeral ports
        assert e["SLURMD_NODENAME"] == ("n1" if rank < 2 else "n2")
        assert e["LOCAL_RANK"] == str(rank % 2)
        assert e["OMP_NUM_THREADS"] == "1"  # its --cpus-per-task, not every core of the node
        if cpu_mode:
            assert "CUDA_VISIBLE_DEVICES" not in e
            assert e["DS_ACCELERATOR"] == "cpu"
        else:  # both GPUs of its node (task/none: Slurm's own device indices, not renumbered)
            assert len(set(e["CUDA_VISIBLE_DEVICES"].split(","))) == 2
            assert e["CUDA_VISIBLE_DEVICES"] == envs[rank ^ 1]["CUDA_VISIBLE_DEVICES"]  # same node, same GPUs
            assert "DS_ACCELERATOR" not in e


@pytest.mark.parametrize("options,message", [
    (["--gpus-per-node=0"], "no GPUs in this job"),
    (["--gpus-per-node=2", "--ntasks-per-node=1"], "expected one task per GPU"),
], ids=["no-gpus", "tasks-ne-gpus"])
def test_gpu_mode_rejects_bad_allocation(slurm_cluster, tmp_path, probe, options, message):
    """Without FEWSTEP_CPU=1 the script refuses an allocation that is not one task per GPU, naming the problem."""
    env = _env(FEWSTEP_PYTHON=str(probe), FEWSTEP_OUTPUT_DIR=str(tmp_path / "out"))
    jobid = slurm_cluster.sbatch(SLURM / "glance.sbatch", options=["--cpus-per-task=1", *options], env=env,
                                 cwd=tmp_path)
    job = slurm_cluster.wait_finished(jobid, 60)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", job
    assert message in _log(tmp_path, job)
    assert not (tmp_path / "out").exists()  # nothing was launched


def test_a_requeue_cap_that_is_not_a_number_is_refused_before_launch(slurm_cluster, tmp_path, probe):
    env = _env(FEWSTEP_PYTHON=str(probe), FEWSTEP_OUTPUT_DIR=str(tmp_path / "out"), FEWSTEP_CPU="1",
               FEWSTEP_MAX_REQUEUES="many")
    jobid = slurm_cluster.sbatch(SLURM / "glance.sbatch", options=["--cpus-per-task=1", "--gpus-per-node=0",
                                                                   "--nodes=1", "--ntasks-per-node=1"],
                                 env=env, cwd=tmp_path)
    job = slurm_cluster.wait_finished(jobid, 60)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", job
    assert "FEWSTEP_MAX_REQUEUES='many': expected a number of requeues" in _log(tmp_path, job)
    assert not (tmp_path / "out").exists()  # nothing was launched


def test_gpus_that_slurm_does_not_count_are_given_by_hand(slurm_cluster, tmp_path, probe):
    """Nodes whose GPUs are not Slurm resources: FEWSTEP_GPUS_PER_NODE stands in for --gpus-per-node, and is checked
    against the tasks per node as the GRES count is."""
    out = tmp_path / "out"
    for gpus, state in (("2", "COMPLETED"), ("1", "FAILED"), ("two", "FAILED")):
        env = _env(FEWSTEP_PYTHON=str(probe), FEWSTEP_OUTPUT_DIR=str(out), FEWSTEP_GPUS_PER_NODE=gpus)
        jobid = slurm_cluster.sbatch(SLURM / "glance.sbatch", options=["--cpus-per-task=1", "--gpus-per-node=0",
                                                                       "--nodes=1", "--ntasks-per-node=2"],
                                     env=env, cwd=tmp_path)
        job = slurm_cluster.wait_finished(jobid, 60)
        assert job["JobState"] == state, f"{gpus}: {job}\n{_log(tmp_path, job)}"
    assert sorted(_task_envs(out)) == [0, 1]
    assert "FEWSTEP_GPUS_PER_NODE='two': expected a number" in _log(tmp_path, job)


def _running_probe_job(cluster, tmp_path, probe, term_delay=0, **extra_env):
    """A 2-node CPU-mode job of probe tasks that sleep until signalled, once both tasks are up: (job id, out)."""
    out = tmp_path / "out"
    env = _env(FEWSTEP_PYTHON=str(probe), FEWSTEP_OUTPUT_DIR=str(out), FEWSTEP_CPU="1", PROBE_SLEEP="120",
               PROBE_TERM_DELAY=str(term_delay), **extra_env)
    jobid = cluster.sbatch(SLURM / "twinflow.sbatch", options=BOTH_NODES, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while len(_task_envs(out)) < 2:
        assert time.monotonic() < deadline, cluster.job(jobid)
        time.sleep(0.1)
    return jobid, out


def test_scancel_cancels_and_does_not_requeue(slurm_cluster, tmp_path, probe):
    """`scancel JOB` sends TERM too; the job script forwards it but must not turn the cancel into a requeue."""
    jobid, out = _running_probe_job(slurm_cluster, tmp_path, probe, term_delay=3)
    slurm_cluster.cmd("scancel", str(jobid))
    job = slurm_cluster.wait_finished(jobid, 60)
    time.sleep(1)  # a (wrong) requeue from the batch shell would land just after the cancel
    job = slurm_cluster.job(jobid)
    log = _log(tmp_path, job)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), f"{job}\n{log}"
    # Usually the batch shell logs "...; not requeueing"; if srun exits before the shell's own TERM arrives, the
    # shell just ends. Either way it must never have asked for a requeue.
    assert "requeueing job" not in log, log
    # every task had a signal and the time to checkpoint (KillWait), not an immediate kill from srun
    assert _stopped_cleanly(out) == [0, 1], log


def test_a_failed_step_says_how_to_resume_in_a_new_job(slurm_cluster, tmp_path, probe):
    """A job that ends without finishing and without a requeue: a resubmitted job gets a new id, and with it a new
    default output directory, so the log names the run's directory (and config) to resume from; a job that failed
    before any checkpoint (e.g. on a config mistake) has nothing to resume, and says nothing of it. Submitted from
    outside a checkout, a job says so in one line."""
    out = tmp_path / "out"
    # every task fails with 3, also one that srun's --kill-on-bad-exit TERMs first (a trainer whose peer is gone
    # cannot checkpoint), and none exits before all are up: srun's status is the highest of its tasks'
    env = _env(FEWSTEP_PYTHON=str(probe), FEWSTEP_OUTPUT_DIR=str(out), FEWSTEP_CPU="1", PROBE_EXIT="3",
               PROBE_TRAP_EXIT="3", PROBE_WAIT_ALL="1")
    logs = []
    for saved in (False, True):
        for up in out.glob("rank-*.env"):  # the first job's tasks: the second waits for its own
            up.unlink()
        if saved:  # the probe saves nothing: a checkpoint of the run, as the trainer leaves one
            (out / "checkpoints").mkdir(parents=True)
            (out / "checkpoints" / "latest").write_text("step-2")
        jobid = slurm_cluster.sbatch(SLURM / "twinflow.sbatch", options=BOTH_NODES, env=env, cwd=tmp_path)
        job = slurm_cluster.wait_finished(jobid, 60)
        logs.append(_log(tmp_path, job))
        assert job["JobState"] == "FAILED" and "job step finished with exit code 3" in logs[-1], f"{job}\n{logs[-1]}"
    assert "to resume this run" not in logs[0], logs[0]
    config = REPO / "configs" / "twinflow" / "qwen_image_lora.json"  # the script's default
    assert f"to resume this run in a new job: FEWSTEP_OUTPUT_DIR='{out}' FEWSTEP_CONFIG='{config}' sbatch" in logs[1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    jobid = slurm_cluster.sbatch(SLURM / "twinflow.sbatch", options=BOTH_NODES, env={**env, "FEWSTEP_ROOT": None},
                                 cwd=elsewhere)
    job = slurm_cluster.wait_finished(jobid, 60)
    log = _log(elsewhere, job)
    assert f"fewstep-slurm: error: FEWSTEP_ROOT='{elsewhere}' is not a fewstep checkout" in log and \
        "No such file" not in log, log


def _stopped_cleanly(out):
    """The ranks whose probe caught a signal and finished its stand-in checkpoint."""
    return sorted({int(f.name.split("-")[1]) for f in out.glob("*-*") if f.name.startswith(("term-", "usr1-"))})


def test_term_to_the_batch_shell_alone_reaches_the_tasks_as_a_checkpoint_request(slurm_cluster, tmp_path, probe):
    """TERM to the batch shell alone (`scancel --batch --signal=TERM`; sites' preemption set-ups): the tasks get
    USR1 and checkpoint. srun answers a TERM of its own with SIGKILL to every task ("forcing job termination"), so
    the batch shell must not pass TERM on as TERM."""
    jobid, out = _running_probe_job(slurm_cluster, tmp_path, probe, term_delay=2)
    slurm_cluster.cmd("scancel", "--batch", "--signal=TERM", str(jobid))
    job = slurm_cluster.wait(jobid, lambda j: j["Restarts"] != "0" or j["JobState"] != "RUNNING", 60)
    slurm_cluster.cmd("scancel", str(jobid), check=False)  # the requeued run would sleep on
    log = _log(tmp_path, job)
    assert (out / "usr1-0").exists() and (out / "usr1-1").exists(), log
    assert "requeueing job" in log and job["Restarts"] == "1", f"{job}\n{log}"  # still RUNNING: requeued as for USR1


@pytest.mark.parametrize("trap_exit, max_requeues, state, said", [
    ("2", None, "FAILED", "job step failed with exit code 2 after SIGUSR1; not requeueing"),
    ("0", None, "COMPLETED", "job step finished (exit code 0) after SIGUSR1: nothing to requeue"),
    (None, "0", "FAILED", "was requeued 0 times already (FEWSTEP_MAX_REQUEUES=0); not requeueing")])
def test_only_a_checkpointed_preemption_is_requeued(slurm_cluster, tmp_path, probe, trap_exit, max_requeues, state,
                                                    said):
    """A step that fails after the signal (its checkpoint could not be written) would fail the same way in every
    requeued slot; one that finished has nothing left to do; and a job requeued FEWSTEP_MAX_REQUEUES times stops."""
    extra = {k: v for k, v in (("PROBE_TRAP_EXIT", trap_exit), ("FEWSTEP_MAX_REQUEUES", max_requeues)) if v}
    jobid, out = _running_probe_job(slurm_cluster, tmp_path, probe, **extra)
    slurm_cluster.cmd("scancel", "--signal=USR1", "--batch", str(jobid))
    job = slurm_cluster.wait_finished(jobid, 60)
    time.sleep(1)  # a (wrong) requeue would land just after the step ends
    job = slurm_cluster.job(jobid)
    log = _log(tmp_path, job)
    assert (job["JobState"], job["Restarts"]) == (state, "0") and said in log, f"{job}\n{log}"
    assert "requeueing job" not in log, log


# ---- the real trainer ----------------------------------------------------------------------------------------------
BARE_SRUN = """#!/bin/bash
cd "$FEWSTEP_ROOT" || exit 2
srun --cpus-per-task=1 "$FEWSTEP_PYTHON" launcher/train.py --config configs/demo/flow.json --max_train_steps 3 \\
    --checkpointing_steps 0 --validation_steps 0 --output_dir "$FEWSTEP_OUTPUT_DIR"
"""


@pytest.fixture(scope="module")
def trainer_jobs(slurm_cluster, tmp_path_factory):
    """Submit every trainer job at once, in CPU test mode, on the tiny demo configs; yield their ids and dirs."""
    for cfg in ("configs/demo/glance.json", "configs/demo/twinflow.json"):
        assert (REPO / cfg).exists(), f"{cfg} is missing: the Slurm tests train the tiny demo configs"
    work = tmp_path_factory.mktemp("slurm-jobs")
    jobs = {}

    def submit(name, script, options, config, *args):
        out = work / name
        env = _env(FEWSTEP_CPU="1", FEWSTEP_OUTPUT_DIR=str(out), **({"FEWSTEP_CONFIG": config} if config else {}))
        jobs[name] = dict(id=slurm_cluster.sbatch(SLURM / script, *args, options=options, env=env, cwd=work),
                          out=out, work=work)

    twinflow_args = ("--max_train_steps", str(TWINFLOW_STEPS))
    submit("preempted", "twinflow.sbatch", BOTH_NODES, "configs/demo/twinflow.json", *twinflow_args)
    submit("reference", "twinflow.sbatch", BOTH_NODES, "configs/demo/twinflow.json", *twinflow_args)
    # Glance as a single-node job, submitted the way a CPU-only cluster would take it: no GPUs at all.
    submit("glance", "glance.sbatch", ["--gpus-per-node=0", "--cpus-per-task=1"], "configs/demo/glance.json")
    # Sampling from the reference run's LoRA once that run has succeeded.
    out_png = work / "sample" / "red-circle.png"
    submit("sample", "sample.sbatch", ["--gpus-per-node=0", "--cpus-per-task=1",
                                       f"--dependency=afterok:{jobs['reference']['id']}"], None,
           "--method", "twinflow", "--lora", str(work / "reference"), "--steps", "2",
           "--prompt", "a red circle", "--output", str(out_png))
    jobs["sample"]["png"] = out_png
    # A user's own job script without slurm/common.sh: a bare `srun python launcher/train.py` on both nodes.
    bare = work / "bare-srun.sh"
    bare.write_text(BARE_SRUN)
    jobs["bare"] = dict(id=slurm_cluster.sbatch(bare, options=[*BOTH_NODES[:2], "--gpus-per-node=0",
                                                               "--cpus-per-task=1", "--output=%x-%j.out"],
                                                env=_env(DS_ACCELERATOR="cpu", FEWSTEP_OUTPUT_DIR=str(work / "bare")),
                                                cwd=work), out=work / "bare", work=work)
    yield jobs
    for j in jobs.values():  # leave nothing running if a test failed early
        slurm_cluster.cmd("scancel", str(j["id"]), check=False)


def test_twinflow_preempt_requeue_resume(slurm_cluster, trainer_jobs):
    """USR1 to the batch shell mid-run: checkpoint, requeue, resume from latest, same losses as an unbroken run."""
    c, j = slurm_cluster, trainer_jobs["preempted"]
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(_read_metrics(j["out"])) < 3:  # let it train a few steps first
        info = c.job(j["id"])
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), f"{info}\n{_log(j['work'], info)}"
        assert time.monotonic() < deadline, "no 3 training steps logged in time"
        time.sleep(0.1)
    c.cmd("scancel", "--signal=USR1", "--batch", str(j["id"]))
    # The job script must requeue: Restarts goes to 1. Stop waiting early if the job ends without a restart.
    info = c.wait(j["id"], lambda i: int(i["Restarts"]) >= 1 or i["JobState"] in FINAL, JOB_TIMEOUT)
    assert info["Restarts"] == "1", f"not requeued after USR1: {info}\n{_log(j['work'], info)}"
    job = _assert_ok(c, j["id"], j["work"])
    assert job["Restarts"] == "1" and job["NumNodes"] == "2" and job["NodeList"] == "n[1-2]", job

    log = _log(j["work"], job)
    preempted = re.findall(r"fewstep: preempted at step (\d+), checkpoint saved", log)
    resumed = re.findall(r"fewstep: resumed from (\S+) at step (\d+)", log)
    assert len(preempted) == 1 and len(resumed) == 1, log
    step = int(preempted[0])
    assert 3 <= step < TWINFLOW_STEPS, f"preempted at step {step}: not mid-run"
    assert resumed[0] == (str(j["out"] / "checkpoints" / f"step-{step}"), str(step)), log
    assert f"requeueing job {j['id']}" in log

    metrics = _read_metrics(j["out"])
    assert [m["step"] for m in metrics] == list(range(1, TWINFLOW_STEPS + 1))  # each step exactly once
    reference_job = _assert_ok(c, trainer_jobs["reference"]["id"], trainer_jobs["reference"]["work"])
    reference = _read_metrics(trainer_jobs["reference"]["out"])
    assert reference_job["Restarts"] == "0"
    assert [m["step"] for m in reference] == list(range(1, TWINFLOW_STEPS + 1))
    # Same config, same 2-rank layout: a resume that restores weights, optimizer, EMA, data order and RNG exactly
    # reproduces the uninterrupted run's losses bit for bit.
    assert [m["loss"] for m in metrics] == [m["loss"] for m in reference], (
        [(m["step"], m["loss"], r["loss"]) for m, r in zip(metrics, reference) if m["loss"] != r["loss"]])
    assert (j["out"] / "pytorch_lora_weights.safetensors").is_file()


def test_twinflow_two_nodes(slurm_cluster, trainer_jobs):
    """The uninterrupted TwinFlow run: 2 tasks on the 2 nodes, all steps logged once, LoRA exported."""
    j = trainer_jobs["reference"]
    job = _assert_ok(slurm_cluster, j["id"], j["work"])
    assert (job["NumNodes"], job["NumTasks"], job["NodeList"], job["Restarts"]) == ("2", "2", "n[1-2]", "0"), job
    log = _log(j["work"], job)
    assert "world 2" in log and "2 tasks, master 127.0.0.1:" in log, log  # n1's NodeAddr
    assert [m["step"] for m in _read_metrics(j["out"])] == list(range(1, TWINFLOW_STEPS + 1))
    for name in ("pytorch_lora_weights.safetensors", "anystep_embeddings.safetensors", "fewstep_run.json"):
        assert (j["out"] / name).is_file(), f"{name} missing in {sorted(os.listdir(j['out']))}"


def test_glance_single_node(slurm_cluster, trainer_jobs):
    """Glance on one node, one task: both phases in one job, Slow and Fast LoRAs exported."""
    j = trainer_jobs["glance"]
    job = _assert_ok(slurm_cluster, j["id"], j["work"])
    assert (job["NumNodes"], job["NumTasks"], job["Restarts"]) == ("1", "1", "0"), job
    steps_per_phase = json.loads((REPO / "configs/demo/glance.json").read_text())["--max_train_steps"]
    assert [m["step"] for m in _read_metrics(j["out"])] == list(range(1, 2 * steps_per_phase + 1))
    for phase in ("glance-slow", "glance-fast"):
        assert (j["out"] / phase / "pytorch_lora_weights.safetensors").is_file(), sorted(os.listdir(j["out"]))


def test_sample_after_training(slurm_cluster, trainer_jobs):
    """sample.sbatch, started by Slurm once the reference run succeeded, writes the image it was asked for."""
    j = trainer_jobs["sample"]
    job = _assert_ok(slurm_cluster, j["id"], j["work"])
    assert job["Dependency"] in ("(null)", ""), job
    assert j["png"].is_file() and j["png"].stat().st_size > 0, _log(j["work"], job)
    assert f"fewstep: wrote {j['png']}" in _log(j["work"], job)


BARE_SRUN_ENV = """#!/bin/bash
srun "$FEWSTEP_PYTHON" -c 'import json, os, sys
sys.path.insert(0, os.path.join(os.environ["FEWSTEP_ROOT"], "src"))
from fewstep.engine.launch import launch_env
print("LAUNCH", json.dumps(launch_env(dict(os.environ))), flush=True)'
"""


def test_bare_srun_rendezvous_at_the_first_nodes_address(slurm_cluster, tmp_path):
    """A bare srun's master is the first node's NodeAddr, as slurm/common.sh's: a node name need not resolve (here
    n1's does, through /etc/hosts, but Slurm reaches n1 at 127.0.0.1)."""
    script = tmp_path / "bare-env.sh"
    script.write_text(BARE_SRUN_ENV)
    jobid = slurm_cluster.sbatch(script, options=[*BOTH_NODES[:2], "--gpus-per-node=0", "--cpus-per-task=1",
                                                  "--output=%x-%j.out"], env=_env(), cwd=tmp_path)
    job = _assert_ok(slurm_cluster, jobid, tmp_path, timeout=120)
    envs = [json.loads(line.split("LAUNCH ", 1)[1]) for line in _log(tmp_path, job).splitlines() if "LAUNCH " in line]
    assert sorted(e["RANK"] for e in envs) == ["0", "1"], _log(tmp_path, job)
    assert all(e["MASTER_ADDR"] == "127.0.0.1" and e["WORLD_SIZE"] == "2" for e in envs), envs


def test_bare_srun_without_common_sh(slurm_cluster, trainer_jobs):
    """`srun python launcher/train.py` with no RANK/WORLD_SIZE in the environment: the trainer reads SLURM_PROCID,
    SLURM_LOCALID and SLURM_STEP_NUM_TASKS and forms one 2-rank world (not two worlds of one on one output dir)."""
    j = trainer_jobs["bare"]
    job = _assert_ok(slurm_cluster, j["id"], j["work"])
    log = _log(j["work"], job)
    assert "world 2" in log and "world 1" not in log, log
    assert [m["step"] for m in _read_metrics(j["out"])] == [1, 2, 3], log
