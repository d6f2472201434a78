"""Checkpoint durability and completeness, on real 2-rank DeepSpeed saves (torchrun, gloo, ZeRO-2 and ZeRO-3).

- every file and directory of a saved checkpoint was fsynced before rank 0's rename, each per-rank file by the rank
  that wrote it; the checkpoints root was fsynced after the rename and after `latest` was replaced;
- `resolve('latest')` skips a checkpoint that lost one rank's shard (with one warning line naming it) and an explicit
  path to it raises naming the missing file;
- a full disk loses nothing: with a small tmpfs as output_dir, a save that hits ENOSPC leaves the previous checkpoint
  and `latest` as they were, removes its partial folder and stops the run with one line saying what happened (the
  2-rank case and the free-space check that refuses to start such a save are in tests/test_resume_layout.py).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fewstep import checkpoint
from fewstep_testing import PY, REPO, cpu_env, read_metrics, run, write_config, write_dataset

STAGES = (2, 3)
PER_RANK = re.compile(r"zero_pp_rank_(\d+)_|^rank(\d+)\.pt$")  # DeepSpeed's per-rank shards, our rank<r>.pt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One torchrun launch: steps 1 and 2 saved per ZeRO stage, with each rank's fsync/replace log."""
    out = os.path.realpath(tmp_path_factory.mktemp("checkpoint"))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO, "tests", "checkpoint_worker.py"), out, *map(str, STAGES)], timeout=600)
    return out


def _logs(saved, stage):
    logs = []
    for r in range(2):
        with open(os.path.join(saved, f"z{stage}", f"audit-rank{r}.json")) as fh:
            logs.append(json.load(fh))
    return logs


@pytest.mark.parametrize("stage", STAGES)
def test_every_file_and_directory_is_fsynced_before_the_rename(saved, stage):
    root = os.path.join(saved, f"z{stage}", "checkpoints")
    final, tmp = os.path.join(root, "step-2"), os.path.join(root, ".tmp-step-2")
    logs = _logs(saved, stage)
    renames = [e for e in logs[0] if e[0] == "replace" and e[2:] == [tmp, final]]
    assert len(renames) == 1, "rank 0 renames the finished checkpoint"
    renamed_at = renames[0][1]
    synced = [{e[2] for e in log if e[0] == "fsync" and e[1] < renamed_at} for log in logs]
    entries = [final] + [os.path.join(here, n) for here, dirs, files in os.walk(final) for n in dirs + files]
    assert len(entries) >= 8
    for path in entries:
        before = tmp + path[len(final):]  # fsynced under its name before the rename
        per_rank = PER_RANK.search(os.path.basename(path))
        if per_rank:
            writer = int(per_rank.group(1) or per_rank.group(2))
            assert before in synced[writer], f"rank {writer} did not fsync its {path[len(root):]} before the rename"
        else:
            assert before in synced[0] | synced[1], f"{path[len(root):]} was not fsynced before the rename"
    # rank 0: the root after the rename, `latest` (its temporary file) and the root again after replacing it
    after = [e for e in logs[0] if e[1] > renamed_at]
    kinds = [(e[0], e[-1]) for e in after]
    latest = os.path.join(root, "latest")
    assert ("fsync", root) in kinds
    i_root = kinds.index(("fsync", root))
    i_latest = kinds.index(("replace", latest))
    latest_tmp = after[i_latest][2]  # the temporary file renamed over `latest`
    assert latest_tmp.startswith(latest + ".tmp")
    assert i_root < i_latest and ("fsync", latest_tmp) in kinds[:i_latest]
    assert ("fsync", root) in kinds[i_latest:]


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_json_lists_every_rank_file(saved, stage):
    path = os.path.join(saved, f"z{stage}", "checkpoints", "step-2")
    with open(os.path.join(path, "trainer.json")) as fh:
        meta = json.load(fh)
    assert meta["world_size"] == 2 and meta["zero_stage"] == stage and meta["step"] == 2
    on_disk = sorted(os.path.relpath(os.path.join(h, n), path) for h, _, files in os.walk(path) for n in files)
    assert meta["files"] == on_disk
    assert {"rank0.pt", "rank1.pt"} <= set(meta["files"])
    assert checkpoint.missing_files(path) == []


@pytest.mark.parametrize("stage,lost", [(2, "rank1.pt"), (2, "state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                        (3, "state/zero_pp_rank_1_mp_rank_00_model_states.pt")])
def test_resolve_skips_a_checkpoint_missing_one_rank_shard(saved, stage, lost, tmp_path, capsys):
    root = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(saved, f"z{stage}", "checkpoints"), root)
    step1, step2 = os.path.join(root, "step-1"), os.path.join(root, "step-2")
    assert checkpoint.resolve(root, "latest") == step2
    assert capsys.readouterr().out == ""
    os.remove(os.path.join(step2, lost))
    assert checkpoint.resolve(root, "latest") == step1
    warning = capsys.readouterr().out.strip().splitlines()
    assert len(warning) == 1 and "step-2" in warning[0] and lost in warning[0] and "step-1" in warning[0], warning
    with pytest.raises(checkpoint.IncompleteCheckpointError, match=lost.replace(".", r"\.")) as err:
        checkpoint.resolve(root, step2)
    assert isinstance(err.value, FileNotFoundError)  # launcher/train.py prints it as one clean error line
    assert checkpoint.resolve(root, step1) == step1
    os.remove(os.path.join(step1, "trainer.json"))  # nothing complete left: start fresh, say why
    assert checkpoint.resolve(root, "latest") is None
    assert "starting fresh" in capsys.readouterr().out


def test_resolve_reads_a_bare_step_name_under_the_run_and_refuses_an_output_dir(saved, tmp_path, monkeypatch):
    """`step-2` (or SimpleTuner's `checkpoint-2`) names the run's own checkpoint whatever the working directory; a
    run's output directory is not a checkpoint, and the error lists the ones it holds."""
    out = tmp_path / "run"
    shutil.copytree(os.path.join(saved, "z2", "checkpoints"), out / "checkpoints")
    root = str(out / "checkpoints")
    monkeypatch.chdir(tmp_path)
    for spec in ("step-2", "checkpoint-2"):
        assert checkpoint.resolve(root, spec) == os.path.join(root, "step-2")
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"is a run's output directory, not a checkpoint: give "
                                                            r"one of its checkpoints under .*\(step-1, step-2\)"):
        checkpoint.resolve(root, str(out))
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"no checkpoint directory at .*step-7' \(this run's: "
                                                            r"step-1, step-2\)"):
        checkpoint.resolve(root, "step-7")
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"at 'lates' \(did you mean 'latest'\?\)"):
        checkpoint.resolve(root, "lates")
    # the checkpoints folder itself, and a folder of the run that holds no checkpoint (both said "incomplete, missing
    # trainer.json (an interrupted save or a lost shard)")
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"checkpoints' is a folder of checkpoints: give one of "
                                                            r"them \(step-1, step-2\), or 'latest'$"):
        checkpoint.resolve(root, root)
    (out / "logs").mkdir()
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"logs' is not a checkpoint \(a checkpoint is a step-N "):
        checkpoint.resolve(root, str(out / "logs"))


def test_resolve_infers_rank_files_of_checkpoints_without_a_file_list(saved, tmp_path):
    """trainer.json from before it listed files: the per-rank families present must be there for every rank."""
    path = str(tmp_path / "step-2")
    shutil.copytree(os.path.join(saved, "z3", "checkpoints", "step-2"), path)
    with open(os.path.join(path, "trainer.json"), "w") as fh:
        json.dump({"method": "test", "step": 2}, fh)
    assert checkpoint.missing_files(path) == []
    os.remove(os.path.join(path, "state", "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    assert checkpoint.missing_files(path) == ["state/zero_pp_rank_0_mp_rank_00_model_states.pt"]


# ---------------------------------------------------------------------------------------------------------------
# A full disk loses nothing (issue #18 §5): a small tmpfs as output_dir, through launcher/train.py
# ---------------------------------------------------------------------------------------------------------------

# `small_disk` (tests/conftest.py): a 256 KiB tmpfs; one checkpoint of the run below (~170 KiB in tmpfs pages)
# fits, a second one does not


def train_on_small_disk(tmp_path, out, **env):
    backend = write_dataset(str(tmp_path / "data"), n=2)
    cfg = write_config(str(tmp_path / "data"), backend, output_dir=str(out), cache_dir=str(tmp_path / "cache"),
                       max_train_steps=6, checkpointing_steps=2)
    return subprocess.run([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(**env),
                          capture_output=True, text=True, timeout=300)


def assert_step2_intact(root):
    assert open(os.path.join(root, "latest")).read().strip() == "step-2"
    assert sorted(os.listdir(root)) == ["latest", "step-2"]  # no partial .tmp-step-4 left behind
    assert checkpoint.missing_files(os.path.join(root, "step-2")) == []
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-2")


def test_save_that_hits_enospc_keeps_the_previous_checkpoint_and_says_so(small_disk, tmp_path, capsys):
    proc = train_on_small_disk(tmp_path, small_disk / "out", FEWSTEP_CHECKPOINT_SPACE_CHECK="0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    root = str(small_disk / "out" / "checkpoints")
    assert_step2_intact(root)
    assert capsys.readouterr().out == ""  # resolve: no warning about an incomplete checkpoint
    msg = one_message(proc.stderr)
    assert msg.startswith("fewstep: checkpoint step-4 was not saved: rank 0 could not write "), msg
    assert "[Errno 28] No space left on device. Nothing was lost: step-2 and `latest` are unchanged, and the " \
           "partial .tmp-step-4 was removed (" in msg and "free now on " + root in msg
    assert "resume_from_checkpoint latest" in msg
    assert [m["step"] for m in read_metrics(str(small_disk / "out"))] == [1, 2, 3, 4]


def one_message(stderr: str) -> str:
    """The launcher's one `fewstep: ...` line (tqdm's bar may precede it on the same line, after a carriage return)."""
    found = re.findall(r"fewstep: [^\r\n]*", stderr)
    assert len(found) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return found[0]



def _complete(root, step):
    path = os.path.join(root, f"step-{step}")
    os.makedirs(path)
    with open(os.path.join(path, "trainer.json"), "w") as fh:
        json.dump({"step": step, "files": []}, fh)
    return path


def test_pruning_keeps_the_newest_of_this_runs_past_and_leaves_a_later_runs_steps(tmp_path):
    """checkpoints_total_limit 3. A plain run keeps its last 3. After a resume from step-1500 (steps 2000-3000 are
    a later run's), the save at 1600 keeps itself, 1000 and 1500, leaves 2000-3000, and `latest` resolves to 1600
    (pruning by step number deleted 1600 and `latest` fell back to the abandoned step-3000)."""
    root = str(tmp_path / "plain")
    for step in (100, 200, 300):
        _complete(root, step)
    tmp = _complete(root, 400).replace("step-400", ".tmp-step-400")
    os.rename(os.path.join(root, "step-400"), tmp)
    assert checkpoint._commit(root, os.path.join(root, "step-400"), tmp, keep=3) is None
    assert sorted(os.listdir(root)) == ["latest", "step-200", "step-300", "step-400"]

    root = str(tmp_path / "rolled-back")
    for step in (500, 1000, 1500, 2000, 2500, 3000):
        _complete(root, step)
    tmp = _complete(root, 1600).replace("step-1600", ".tmp-step-1600")
    os.rename(os.path.join(root, "step-1600"), tmp)
    assert checkpoint._commit(root, os.path.join(root, "step-1600"), tmp, keep=3) is None
    assert sorted(os.listdir(root), key=lambda d: (d != "latest", len(d), d)) == [
        "latest", "step-1000", "step-1500", "step-1600", "step-2000", "step-2500", "step-3000"]
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-1600")
    assert checkpoint.later_than(root, 1600) == ["step-2000", "step-2500", "step-3000"]  # named at the resume
    os.remove(os.path.join(root, "step-1600", "trainer.json"))  # this run's newest lost: its own earlier step next
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-1500")


def test_pruning_after_a_resume_with_another_interval_keeps_this_runs_own(tmp_path):
    """An earlier run kept step-1500 and step-2000 (limit 2); this run resumed from 1500 with checkpointing_steps 700,
    so it never re-saves 2000. Its save at 2200 keeps its own 1500 (counting 2000 as its past deleted 1500 and kept
    the abandoned run's 2000); its save at 2900, after a requeue (the names come from 2200's trainer.json), prunes
    1500; 2000 stays, never counted."""
    root = str(tmp_path / "checkpoints")
    for step in (1500, 2000):
        _complete(root, step)
    abandoned = checkpoint.later_than(root, 1500)  # what the trainer names at the resume
    for step, kept in ((2200, ["step-1500", "step-2000", "step-2200"]), (2900, ["step-2000", "step-2200", "step-2900"])):
        tmp = _complete(root, step).replace(f"step-{step}", f".tmp-step-{step}")
        os.rename(os.path.join(root, f"step-{step}"), tmp)
        assert checkpoint._commit(root, os.path.join(root, f"step-{step}"), tmp, keep=2, abandoned=abandoned) is None
        assert sorted(d for d in os.listdir(root) if d != "latest") == kept
        assert checkpoint.resolve(root, "latest") == os.path.join(root, f"step-{step}")


def test_latest_not_updated_after_a_complete_save_resumes_the_newer_step(tmp_path, capsys):
    """A save renamed step-2000 into place and was killed before `latest` moved on from step-1500: step-2000 is this
    run's (step-1500's record names no abandoned step), so the resume takes it, saying so; a rollback's abandoned
    step (recorded) is not taken, nor one above a checkpoint of before the record (no `abandoned` key)."""
    root = str(tmp_path / "checkpoints")
    for step, abandoned in ((1500, []), (2000, [])):
        path = _complete(root, step)
        with open(os.path.join(path, "trainer.json"), "w") as fh:
            json.dump({"step": step, "files": [], "abandoned": abandoned}, fh)
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write("step-1500")
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-2000")
    assert "step-2000 is complete but `latest` names step-1500" in capsys.readouterr().out
    with open(os.path.join(root, "step-1500", "trainer.json"), "w") as fh:  # step-2000: an abandoned run's
        json.dump({"step": 1500, "files": [], "abandoned": ["step-2000"]}, fh)
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-1500")
    with open(os.path.join(root, "step-1500", "trainer.json"), "w") as fh:  # written before the record
        json.dump({"step": 1500, "files": []}, fh)
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-1500")


def test_latest_naming_a_checkpoint_that_is_gone_says_so(tmp_path, capsys):
    """A checkpoint deleted by hand after `latest` named it: the newest one left is resumed, with a line saying so
    (it was resumed silently)."""
    root = str(tmp_path / "checkpoints")
    for step in (2, 4):
        _complete(root, step)
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write("step-4")
    shutil.rmtree(os.path.join(root, "step-4"))
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-2")
    assert "`latest` names step-4, which is not there; resuming from step-2" in capsys.readouterr().out
    shutil.rmtree(os.path.join(root, "step-2"))
    assert checkpoint.resolve(root, "latest") is None
    assert "no checkpoint left, starting fresh" in capsys.readouterr().out


def _resave(root, step, marker):
    """A finished .tmp-step-N holding `marker`, as a re-save of step N leaves it before its commit."""
    tmp = os.path.join(root, f".tmp-step-{step}")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "trainer.json"), "w") as fh:
        json.dump({"step": step, "files": [], "marker": marker}, fh)
    return tmp


def _marker(path):
    with open(os.path.join(path, "trainer.json")) as fh:
        return json.load(fh).get("marker")


def test_a_resave_never_leaves_the_step_missing(tmp_path, monkeypatch):
    """Re-saving step N (a resume from an earlier step saving a step the abandoned run had saved) once deleted the
    live step-N before the new copy replaced it: a kill in that window (minutes, for a 20B checkpoint) left no step-N,
    and `latest` fell back to an older step or to a later run's. The old copy is now renamed aside until the new one
    is in place, and put back if the commit stopped in between."""
    root = str(tmp_path / "ckpt")
    _complete(root, 100)
    final = _complete(root, 200)
    assert checkpoint._commit(root, final, _resave(root, 200, "first"), keep=5) is None
    assert checkpoint._commit(root, final, _resave(root, 200, "again"), keep=5) is None  # the normal re-save
    assert _marker(final) == "again" and sorted(os.listdir(root)) == ["latest", "step-100", "step-200"]

    real = os.replace

    def killed_before_the_new_copy_lands(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise KeyboardInterrupt  # the process ends here
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_copy_lands)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._commit(root, final, _resave(root, 200, "third"), keep=5)
    monkeypatch.setattr(os, "replace", real)
    assert not os.path.exists(final)  # only the aside copy holds step 200 now
    assert checkpoint.resolve(root, "latest") == final and _marker(final) == "again"
    assert not [n for n in os.listdir(root) if n.startswith(".replaced-")]


def test_a_fresh_run_is_refused_where_a_step_survives_only_as_its_resaves_aside_copy(tmp_path):
    """A re-save killed between its two renames leaves step N only as `.replaced-step-N`. A fresh run into that folder
    is refused as for any earlier run's checkpoint, and the step is put back (the check listed `step-*` only: the
    fresh run went ahead, and its own save of step N deleted the earlier run's only copy)."""
    from fewstep.checkpoint_resume import find_resume

    root = str(tmp_path / "ckpt")
    os.rename(_complete(root, 200), os.path.join(root, ".replaced-step-200"))
    with pytest.raises(checkpoint.EarlierRunCheckpoints, match=r"holds an earlier run's checkpoints \(step-200\)"):
        find_resume(root, None, {}, use_ema=False)
    assert sorted(os.listdir(root)) == ["step-200"]


def _mapped_files(t) -> set[str]:
    """The files whose mappings hold tensor `t`'s memory (empty: t is in anonymous memory, read or copied there)."""
    start = t.data_ptr()
    files = set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= start < hi and len(fields) > 5:
                files.add(os.path.realpath(fields[5]))
    return files


def test_a_native_resume_maps_the_rank_state_and_its_ema_from_the_file(tmp_path):
    """A rank's EMA shadow is a tenth of the fp32 model per rank on 8 GPUs: a resume copies it into place from the
    file's pages (memory-mapped, on the CPU whatever device wrote it), not after reading it whole into memory."""
    import torch

    from fewstep.checkpoint_resume import read_rank_state
    from fewstep.checkpoint_space import save_torch

    shadow = [torch.randn(300, 1000), torch.randn(77)]
    save_torch({"ema": {"shadow": shadow, "decay": 0.5}, "rng": {"torch": torch.get_rng_state()}, "order": {"i": 3}},
               str(tmp_path / "rank1.pt"))
    state = read_rank_state(str(tmp_path), 1)
    assert state["order"] == {"i": 3} and state["ema"]["decay"] == 0.5
    assert all(torch.equal(a, b) for a, b in zip(state["ema"]["shadow"], shadow))
    assert _mapped_files(state["ema"]["shadow"][0]) == {os.path.realpath(tmp_path / "rank1.pt")}
    with pytest.raises(RuntimeError, match="has no state for rank 0: was it written with a different world size"):
        read_rank_state(str(tmp_path), 0)


def test_a_damaged_rank_file_of_a_checkpoint_without_an_ema_record_is_named_in_one_line(tmp_path):
    """A checkpoint written before trainer.json recorded its EMA has its rank0.pt read while the resume is planned:
    a damaged one there ends in the same one-line error as in the restore, not a traceback from torch."""
    from fewstep.checkpoint_resume import DamagedCheckpointError, find_resume

    root = str(tmp_path / "ckpt")
    _complete(root, 100)
    path = _complete(root, 200)
    with open(os.path.join(path, "rank0.pt"), "wb") as fh:
        fh.write(b"not a checkpoint" * 64)
    with pytest.raises(DamagedCheckpointError, match=r"step-200' has a file that cannot be read \(not a torch zip "
                                                     r"archive\); .*resume_from_checkpoint .*step-100"):
        find_resume(root, path, {}, use_ema=True)


def test_a_resume_puts_the_configured_optimizer_settings_over_the_saved_ones():
    """The optimizer and LR-schedule state a checkpoint restores carry the saved run's rate, betas, eps and weight
    decay; `apply_configured_settings` makes this run's config win and keeps the schedule's position (a warmup
    half done stays half done, at the new rate). Restored here as DeepSpeed restores them, with load_state_dict."""
    from types import SimpleNamespace

    import torch

    from fewstep.checkpoint_resume import apply_configured_settings
    from fewstep.config import load_config
    from fewstep.engine.deepspeed_engine import lr_lambda

    def schedule(cfg):
        weight = torch.nn.Parameter(torch.randn(3))
        opt = torch.optim.AdamW([weight], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay)
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    base = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", "lr_warmup_steps": 4,
            "lr_scheduler": "cosine", "max_train_steps": 10}
    old = schedule(load_config(None, {**base, "learning_rate": 1e-3}))
    for _ in range(2):
        old.optimizer.step()
        old.step()
    cfg = load_config(None, {**base, "learning_rate": 1e-4, "adam_beta2": 0.99, "adam_weight_decay": 0.1})
    new = schedule(cfg)
    new.optimizer.load_state_dict(old.optimizer.state_dict())
    new.load_state_dict(old.state_dict())
    assert new.optimizer.param_groups[0]["weight_decay"] == 0.01  # what the load alone leaves
    changes = apply_configured_settings(SimpleNamespace(lr_scheduler=new), cfg)
    assert changes == ["learning_rate 0.001 -> 0.0001", "adam_beta1/adam_beta2 0.9/0.999 -> 0.9/0.99",
                       "adam_weight_decay 0.01 -> 0.1"]
    group = new.optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.9, 0.99), 0.1, 1e-8)
    assert group["lr"] == new.get_last_lr()[0] == pytest.approx(1e-4 * 3 / 5)  # warmup step 2 of 4
    new.optimizer.step()
    new.step()
    assert new.get_last_lr()[0] == pytest.approx(1e-4 * 4 / 5) and new.base_lrs == [1e-4]
    assert apply_configured_settings(SimpleNamespace(lr_scheduler=new), cfg) == []  # the same settings: no note


def test_deepspeed_checkpoint_reads_are_memory_mapped(tmp_path):
    """Every rank reads DeepSpeed's whole module-states file at a resume (a ZeRO-1/2 full model): mapped, the ranks
    of a node share the page cache instead of each holding its own copy in RAM. Not under ZeRO-0, whose file holds
    the optimizer state (a CPU optimizer would keep its moments mapped to the old file)."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from fewstep.checkpoint_space import mapped_loads

    path = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"module": {"w": torch.arange(1 << 16, dtype=torch.float32)}}, path)
    engine = type("Engine", (), {"zero_optimization_stage": lambda self: self.stage})()
    engine.checkpoint_engine, engine.stage = TorchCheckpointEngine(), 2

    def mapped(state) -> bool:
        return _mapped_files(state["module"]["w"]) == {os.path.realpath(path)} and state["module"]["w"].sum() > 0

    with mapped_loads(engine):
        assert mapped(engine.checkpoint_engine.load(path, map_location="cpu"))
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method again
    assert not mapped(engine.checkpoint_engine.load(path, map_location="cpu"))
    engine.stage = 0
    with mapped_loads(engine):
        assert not mapped(engine.checkpoint_engine.load(path, map_location="cpu"))
