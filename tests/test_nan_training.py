"""A non-finite step never reaches the model, in every ZeRO stage and precision, on 2 ranks.

Rank 1 alone gets a NaN loss at step 3 (FEWSTEP_FAULT_NAN_LOSS). Both ranks must skip the update together; the state
right after the skipped step (saved by a preemption signalled in the same step) must equal, bit for bit, the state
of a clean run stopped after step 2: fp32 masters (read back with DeepSpeed's zero_to_fp32), Adam moments and step
counts, and the LR schedule. The run then resumes and finishes with finite exports; `nan_policy: stop` ends the run
with the last checkpoint intact and nothing exported. Weights that turn non-finite past that guard
(FEWSTEP_FAULT_POISON_WEIGHTS) never reach a checkpoint or an export, on 2 ranks and through launcher/train.py on 1.
"""
import glob
import json
import math
import os
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from fewstep_testing import PY, REPO, cpu_env, read_metrics, run, write_config, write_dataset

# stage 0 fp32 is the layout where DeepSpeed itself would apply a non-finite update
COMBOS = [(1, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16"), (1, "bf16"), (2, "fp32"), (0, "fp32")]
FAULT = {"FEWSTEP_FAULT_NAN_LOSS": "3:1", "FEWSTEP_FAULT_SIGNAL_AT_STEP": "3"}


def _leaves(obj, path=""):
    """(path, value) for every tensor and number in a nested checkpoint structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}/{i}")
    elif isinstance(obj, (torch.Tensor, int, float)) and not isinstance(obj, bool):
        yield path, obj


def _optimizer_state(ckpt):
    """Adam moments, step counts and LR-schedule state of every rank's shard (the flat fp32 master partitions are
    compared through zero_to_fp32 instead: ZeRO pads them with uninitialised memory)."""
    out = {}
    for f in sorted(glob.glob(os.path.join(ckpt, "state", "*optim_states.pt"))):
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for path, v in _leaves(sd.get("base_optimizer_state", sd.get("optimizer_state_dict", {}))):
            out[os.path.basename(f) + path] = v
    for f in sorted(glob.glob(os.path.join(ckpt, "state", "*model_states.pt"))):
        states = torch.load(f, map_location="cpu", weights_only=False)
        sched = states.get("lr_scheduler") or {}
        out[os.path.basename(f) + "/lr"] = (sched.get("last_epoch"), tuple(sched.get("_last_lr", ())))
        for path, v in _leaves(states.get("optimizer") or {}):  # stage 0 keeps the optimizer state here
            out[os.path.basename(f) + "/optimizer" + path] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                          b.view(-1).view(torch.uint8))
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    backend = write_dataset(str(root), n=4)
    cfg = write_config(str(root), backend, train_batch_size=1, checkpointing_steps=1, lr_scheduler="linear",
                       lr_warmup_steps=2, max_train_steps=4, resume_from_checkpoint="latest",
                       cache_dir=str(root / "cache"))
    plan = []
    for stage, prec in COMBOS:
        tag, common = f"z{stage}-{prec}", {"zero_stage": stage, "mixed_precision": prec}
        plan += [[f"ref-{tag}", {**common, "max_train_steps": 2}, {}],
                 [f"nan-{tag}", common, FAULT],   # skip at step 3 + preempted: saves the state after the skip
                 [f"nan-{tag}", common, {}]]      # resume, finish
    plan.append(["stop-z2", {"zero_stage": 2, "nan_policy": "stop"}, {"FEWSTEP_FAULT_NAN_LOSS": "3:1"}])
    streak = {"zero_stage": 2, "nan_policy": "skip-then-stop", "nan_max_bad_steps": 2}
    plan += [["streak-z2", streak, FAULT],                                # one bad step, then preempted
             ["streak-z2", streak, {"FEWSTEP_FAULT_NAN_LOSS": "3:1"}]]  # the requeue: a second one in a row
    twin = {"zero_stage": 2, "twinflow_enabled": True, "use_ema": True, "ema_decay": 0.9}  # an EMA teacher
    plan += [["ref-twin", {**twin, "max_train_steps": 2}, {}], ["nan-twin", twin, FAULT]]
    plan.append(["poison-z3", {"zero_stage": 3}, {"FEWSTEP_FAULT_POISON_WEIGHTS": "3:1"}])  # rank 1's shard
    proc = run(["torchrun", "--nproc_per_node", "2", "--standalone", "tests/nan_training_worker.py", cfg,
                json.dumps(plan)], timeout=900)
    return root / "out", proc.stdout


@pytest.mark.parametrize("stage,prec", COMBOS)
def test_skipped_step_leaves_the_state_bit_identical(runs, stage, prec):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out, stdout = runs
    tag = f"z{stage}-{prec}"
    ref, bad = out / f"ref-{tag}" / "checkpoints" / "step-2", out / f"nan-{tag}" / "checkpoints" / "step-2"
    if stage == 0:  # no ZeRO partitions: the module state is the fp32 weights
        masters = [torch.load(c / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
                   for c in (ref, bad)]
    else:
        masters = [get_fp32_state_dict_from_zero_checkpoint(str(c), tag="state") for c in (ref, bad)]
    assert masters[0].keys() == masters[1].keys() and masters[0]
    assert all(_same(masters[0][k], masters[1][k]) for k in masters[0]), tag
    a, b = _optimizer_state(ref), _optimizer_state(bad)
    assert a.keys() == b.keys() and any("exp_avg" in k for k in a), sorted(a)[:5]
    assert [k for k in a if not _same(a[k], b[k])] == [], tag
    # the run went on from there: every step logged once, nothing non-finite exported
    metrics = read_metrics(out / f"nan-{tag}")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in metrics)
    lora = load_file(out / f"nan-{tag}" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in lora.values())


def test_both_ranks_skip_and_say_so(runs):
    _, stdout = runs
    for stage, prec in COMBOS:
        assert f'RESULT nan-z{stage}-{prec} {{"step": 2, "preempted": true, "signal": "SIGUSR1"}}' in stdout
    # the loss is NaN on one rank, so both flags are set; rank 0 (which logs) names its own non-finite terms, if any
    said = re.findall(r"step 3: non-finite loss and gradients \(on some rank(?:; here: [\w, ]+)?\): update skipped",
                      stdout)
    assert len(said) == len(COMBOS) + 4, stdout[-3000:]  # and stop-z2, streak-z2 twice, nan-twin


def test_nan_policy_stop_keeps_the_last_checkpoint_and_exports_nothing(runs):
    out, stdout = runs
    assert "RESULT stop-z2" in stdout and "nan_policy stop" in stdout
    run_dir = out / "stop-z2"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert not (run_dir / "pytorch_lora_weights.safetensors").exists()
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]


def test_a_streak_of_bad_steps_survives_a_requeue(runs):
    """nan_max_bad_steps counts bad steps in a row across a preemption: the requeued run's first bad step is the
    streak's second (it counted afresh, so a diverged run got nan_max_bad_steps more tries at every requeue)."""
    out, stdout = runs
    results = [json.loads(line.split(" ", 2)[2]) for line in stdout.splitlines()
               if line.startswith("RESULT streak-z2 ")]
    assert results[0] == {"step": 2, "preempted": True, "signal": "SIGUSR1"}, results
    assert "2 steps in a row (nan_max_bad_steps 2)" in results[1].get("stopped", ""), results
    run_dir = out / "streak-z2"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert not (run_dir / "pytorch_lora_weights.safetensors").exists()


def test_non_finite_weights_never_reach_a_checkpoint(runs):
    """Weights that turn non-finite after an applied step (here one NaN in rank 1's ZeRO-3 shard, past the
    step-level guard): every rank refuses checkpoint step-3 together, the earlier ones stay and nothing is exported."""
    out, stdout = runs
    results = [json.loads(line.split(" ", 2)[2]) for line in stdout.splitlines()
               if line.startswith("RESULT poison-z3 ")]
    assert len(results) == 1 and "checkpoint step-3 not written" in results[0].get("stopped", ""), results
    run_dir = out / "poison-z3"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step-1", "step-2"]
    assert not (run_dir / "pytorch_lora_weights.safetensors").exists()


def test_non_finite_weights_end_the_launched_run_in_one_line_before_their_checkpoint(tmp_path):
    """The same through launcher/train.py on 1 rank, with fp32 masters apart from the bf16 weights the model computes
    with (ZeRO-2): one `fewstep:` line and exit status 1 at checkpoint step-3, which is not written; step-1 and step-2
    stay intact (the requeued run resumes from step-2 and finishes) and no export exists until then."""
    backend = write_dataset(str(tmp_path), n=4)
    cfg = write_config(str(tmp_path), backend, train_batch_size=1, checkpointing_steps=1, max_train_steps=4,
                       zero_stage=2, mixed_precision="bf16", resume_from_checkpoint="latest",
                       cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out"

    def launch(**env):
        return subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(**env),
                              capture_output=True, text=True, timeout=600)

    proc = launch(FEWSTEP_FAULT_POISON_WEIGHTS="3:0")
    said = [line for line in proc.stderr.splitlines() if line.startswith("fewstep:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(said) == 1, proc.stderr[-3000:]
    assert said[0].startswith("fewstep: the trained weights are non-finite: checkpoint step-3 not written"), said
    assert "ZeRO-2 | bfloat16" in proc.stdout  # the layout with separate fp32 masters
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-1", "step-2"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    resumed = launch()
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(torch.isfinite(v).all() for v in lora.values())


def test_a_skipped_twinflow_step_leaves_the_ema_teacher_as_it_was(runs):
    """TwinFlow's EMA teacher is updated once before the first step and after every applied one (the reference's
    update before each step's teacher passes, on the same weights): a skipped step moves neither the shadow nor its
    decay warm-up. Checked on both ranks' saved EMA, against the clean run stopped after step 2."""
    out, stdout = runs
    assert 'RESULT nan-twin {"step": 2, "preempted": true, "signal": "SIGUSR1"}' in stdout
    ref, bad = (out / name / "checkpoints" / "step-2" for name in ("ref-twin", "nan-twin"))
    decay = 0.0
    for _ in range(3):  # the warm-up d <- d + (1 - d)(D - d)/2 from 0: the initial update and steps 1, 2
        decay = decay + (1 - decay) * (0.9 - decay) / 2
    for rank in (0, 1):
        a, b = (torch.load(c / f"rank{rank}.pt", weights_only=False)["ema"] for c in (ref, bad))
        assert a["decay"] == b["decay"] == pytest.approx(decay, rel=1e-12)
        assert len(a["shadow"]) == len(b["shadow"]) > 0
        assert all(_same(x, y) for x, y in zip(a["shadow"], b["shadow"])), rank
