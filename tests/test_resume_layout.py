"""Resuming with a changed layout (issue #18 §2), on real DeepSpeed runs (torchrun, gloo, fp32, tiny Flux).

What "continues bit-exactly against an uninterrupted run" means here. A 2-rank and a 1-rank run never train
identically (each rank draws its own noise), so a checkpoint is resharded *to the layout of the uninterrupted run*
and compared with it: the uninterrupted run U saves at step 2; its step-2 state is resharded to the other layout and
saved there with no training in between (world size 1 -> 2, or ZeRO-3 -> ZeRO-2); that checkpoint is resharded back
(2 ranks -> 1, ZeRO-2 -> ZeRO-3) and trains steps 3-4. Its losses, final weights and EMA export must equal U's bit for
bit, which needs every piece of state to survive both reshards: fp32 masters, Adam moments and step, LR schedule,
EMA, data-order and Glance timestep cursors, and the RNG of every rank that existed in both layouts (a new rank gets
streams seeded from (seed, rank, step)). Independently of fewstep's files, the worker dumps the live state through
DeepSpeed's API just before each save and right after each restore, and every restore must reproduce what was saved,
bit for bit, in every layout (including the weights the model computes with).

Three launches (1 rank, 2 ranks, 1 rank) run every training; the tests then read their outputs.
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fewstep.checkpoint_layout import TRAINABLE_FILE, ResumeMismatch, plan
from fewstep_testing import REPO, mount_small_disk, read_metrics, run, write_config, write_dataset

FULL = {"model_type": "full", "learning_rate": 1e-4, "flow_custom_timesteps": None}  # a listed run needs a LoRA
FULL_Z3 = {**FULL, "zero_stage": 3}
FULL_Z3_BF16 = {**FULL_Z3, "mixed_precision": "bf16"}
LORA_FILES = ["pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"]
Z0_BF16 = {"zero_stage": 0, "mixed_precision": "bf16"}  # DeepSpeed's FP16 wrappers: unfused (torch AdamW) ...
Z0_BF16_FUSED = {**Z0_BF16, "optimizer": "deepspeed"}  # ... and fused (FusedAdam: one flat fp32 copy per group)
FULL_FILES = ["transformer/diffusion_pytorch_model.safetensors", "ema/transformer/diffusion_pytorch_model.safetensors"]


def launch(cfg, nproc, runs, **env):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         os.path.join(REPO, "tests", "resume_layout_worker.py"), cfg, json.dumps(runs)], timeout=900, **env)


def legacy_copy(src, dst):
    """A copy of checkpoint `src` as fewstep wrote it before the layout record: no layout, no trainable.pt."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, TRAINABLE_FILE))
    with open(os.path.join(dst, "trainer.json")) as fh:
        meta = json.load(fh)
    for key in ("layout", "ema"):
        meta.pop(key)
    meta["files"].remove(TRAINABLE_FILE)
    with open(os.path.join(dst, "trainer.json"), "w") as fh:
        json.dump(meta, fh)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    backend = write_dataset(str(root), n=4)
    cfg = write_config(str(root), backend, max_train_steps=4, train_batch_size=1, checkpointing_steps=2,
                       cache_dir=str(root / "cache"), use_ema=True, ema_decay=0.9,
                       flow_custom_timesteps="0.9,0.7,0.5", flow_timesteps_mode="round-robin")
    o = root / "out"

    def from_(name, step=2):
        return str(o / name / "checkpoints" / f"step-{step}")

    # full disks (§5), tmpfs: one checkpoint fits (~200 KiB in tmpfs pages on 2 ranks), a second one does not
    disk, check = mount_small_disk(o / "disk-full", "320k"), mount_small_disk(o / "disk-check", "256k")
    universal = False
    try:
        # uninterrupted 1-rank runs, saving at steps 2 and 4; lora-w1's first attempt at step 1 is skipped (a NaN
        # loss), so DeepSpeed's step counters (global 3, skipped 1 at step 2) must survive the reshards too
        launch(cfg, 1, [["lora-w1", {"_env": {"FEWSTEP_FAULT_NAN_LOSS": "1:0"}}], ["full-w1", FULL],
                        ["full-z3-w1", FULL_Z3], ["full-z3-bf16-w1", FULL_Z3_BF16],
                        ["lora-z0-bf16", Z0_BF16], ["lora-z0-bf16-fused", Z0_BF16_FUSED],
                        ["full-z0-bf16-w1", {**FULL, **Z0_BF16}]])
        launch(cfg, 2, [  # 1 -> 2 ranks, no training: saved again in the 2-rank layout
            ["lora-w2", {"resume_from_checkpoint": from_("lora-w1"), "max_train_steps": 2}],
            ["full-w2", {**FULL, "resume_from_checkpoint": from_("full-w1"), "max_train_steps": 2}],
            ["full-z3-w2", {**FULL_Z3, "resume_from_checkpoint": from_("full-z3-w1"), "max_train_steps": 2}],
            ["full-z3-bf16-w2", {**FULL_Z3_BF16, "resume_from_checkpoint": from_("full-z3-bf16-w1"),
                                 "max_train_steps": 2}],
            # ZeRO-3 uninterrupted; its step 2 to ZeRO-2 (no training), then back to ZeRO-3 for steps 3-4
            ["lora-z3", {"zero_stage": 3}],
            ["lora-z3-z2", {"resume_from_checkpoint": from_("lora-z3"), "max_train_steps": 2}],
            ["lora-z2-z3", {"zero_stage": 3, "resume_from_checkpoint": from_("lora-z3-z2")}],
            # the same without an EMA: ZeRO-3 then keeps the small LoRA weights gathered ("persistent")
            ["lora-z2-z3-noema", {"zero_stage": 3, "use_ema": False,
                                  "resume_from_checkpoint": from_("lora-z3-z2")}],
            # stage 0 bf16 (1 rank) to 2 ranks at stage 0 (every rank holds the whole EMA) and to ZeRO-2, no
            # training; back to 1 rank at stage 0 below for steps 3-4
            ["lora-z0-bf16-w2", {**Z0_BF16, "resume_from_checkpoint": from_("lora-z0-bf16"), "max_train_steps": 2}],
            ["full-z0-bf16-w2", {**FULL, **Z0_BF16, "resume_from_checkpoint": from_("full-z0-bf16-w1"),
                                 "max_train_steps": 2}],
            *[[f"lora-z0-bf16{v}-z2", {"zero_stage": 2, "mixed_precision": "bf16", "optimizer": opt,
                                       "resume_from_checkpoint": from_(f"lora-z0-bf16{v}"), "max_train_steps": 2}]
              for v, opt in (("", "adamw"), ("-fused", "deepspeed"))],
            # refused on both ranks alike: a full fine-tune changing stage (and world size)
            ["full-w2-z3", {**FULL, "zero_stage": 3, "resume_from_checkpoint": from_("full-w1")}],
            # ENOSPC in a 2-rank save (the free-space check off, so that the write itself fails)
            *([["disk-full", {"max_train_steps": 6}]] if disk else [])], FEWSTEP_CHECKPOINT_SPACE_CHECK="0")
        legacy_copy(from_("lora-w1"), str(o / "legacy-w1"))
        legacy_copy(from_("lora-w2"), str(o / "legacy-w2"))
        # full-w2's step-2 on a tmpfs it fills but for 128 KiB: its universal conversion (2 -> 1 rank) cannot fit
        blocks = sum(-(-f.stat().st_size // 4096) * 4096 for f in (o / "full-w2" / "checkpoints" / "step-2").rglob("*")
                     if f.is_file())
        universal = mount_small_disk(o / "disk-universal", f"{blocks // 1024 + 128}k")
        if universal:
            shutil.copytree(from_("full-w2"), o / "disk-universal" / "step-2")
        no_room = {**FULL, "resume_from_checkpoint": str(o / "disk-universal" / "step-2")}
        launch(cfg, 1, [  # 2 -> 1 rank: steps 3-4
            ["lora-back", {"resume_from_checkpoint": from_("lora-w2")}],
            ["full-back", {**FULL, "resume_from_checkpoint": from_("full-w2")}],
            ["full-z3-back", {**FULL_Z3, "resume_from_checkpoint": from_("full-z3-w2")}],
            ["full-z3-bf16-back", {**FULL_Z3_BF16, "resume_from_checkpoint": from_("full-z3-bf16-w2")}],
            # checkpoints from before the layout record: same layout (DeepSpeed's own load), and 2 -> 1 (universal)
            ["legacy-same", {"resume_from_checkpoint": str(o / "legacy-w1")}],
            ["legacy-back", {"resume_from_checkpoint": str(o / "legacy-w2")}],
            ["lora-z2-z0-bf16", {**Z0_BF16, "resume_from_checkpoint": from_("lora-z0-bf16-z2")}],
            ["lora-z0-bf16-back", {**Z0_BF16, "resume_from_checkpoint": from_("lora-z0-bf16-w2")}],
            ["full-z0-bf16-back", {**FULL, **Z0_BF16, "resume_from_checkpoint": from_("full-z0-bf16-w2")}],
            # another optimizer: a LoRA's trainable.pt carries over to it; a full fine-tune's state cannot
            ["lora-opt", {"optimizer": "deepspeed", "resume_from_checkpoint": from_("lora-w1")}],
            ["full-opt", {**FULL, "optimizer": "deepspeed", "resume_from_checkpoint": from_("full-w1")}],
            ["lora-z2-z0-bf16-fused", {**Z0_BF16_FUSED, "resume_from_checkpoint": from_("lora-z0-bf16-fused-z2")}],
            # refused
            ["lora-rank", {"lora_rank": 8, "resume_from_checkpoint": from_("lora-w2")}],
            ["lora-many", {"lora_rank": 8, "lora_alpha": 16, "lora_targets": "to_q,to_k", "mixed_precision": "bf16",
                           "resume_from_checkpoint": from_("lora-w1")}],
            ["full-z3", {**FULL, "zero_stage": 3, "resume_from_checkpoint": from_("full-w1")}],
            # the free-space check refuses to start the second save
            *([["disk-check", {"max_train_steps": 6}]] if check else []),
            # the universal conversion that cannot fit: refused before it starts, and (check off) failing half way
            *([["disk-universal-check", no_room],
               ["disk-universal-write", {**no_room, "_env": {"FEWSTEP_CHECKPOINT_SPACE_CHECK": "0"}}]]
              if universal else [])])
        yield o
    finally:
        for name, mounted in (("disk-full", disk), ("disk-check", check), ("disk-universal", universal)):
            if mounted:
                subprocess.run(["umount", "-l", str(o / name)], check=False)


def outcome(o, name, rank=0):
    with open(o / name / f"outcome-rank{rank}.json") as fh:
        return json.load(fh)


def assert_continues(o, reference, resumed, files):
    """Steps 3-4 of `resumed` equal `reference`'s (losses, LR, sigmas), and so do its final weights and EMA."""
    a, b = read_metrics(o / reference), read_metrics(o / resumed)
    assert [m["step"] for m in b] == [3, 4], b
    for key in ("loss", "lr", "sigma_mean"):
        assert [m[key] for m in a[2:]] == [m[key] for m in b], (key, a, b)
    for f in files:
        wa, wb = load_file(o / reference / f), load_file(o / resumed / f)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (resumed, f)
    assert outcome(o, resumed) == {"ok": {"step": 4, "preempted": False}}


def assert_restored(o, source, resumed, mode):
    """What `resumed` restored is, bit for bit, what `source` held when it saved step 2 (DeepSpeed's own view)."""
    saved = torch.load(o / source / "saved-step2.pt", weights_only=False)
    got = torch.load(o / resumed / "restored-step2.pt", weights_only=False)
    assert got["mode"] == mode
    assert saved["state"].keys() == got["state"].keys() and len(saved["state"]) > 0
    for name, values in saved["state"].items():
        assert set(values) == {"fp32", "exp_avg", "exp_avg_sq"}, values.keys()
        for key, value in values.items():
            assert torch.equal(value, got["state"][name][key]), (resumed, name, key)
        master = got["state"][name]["fp32"]  # the weights the model computes with: the master in the run's dtype
        master = master.bfloat16().float() if "bf16" in resumed else master
        assert torch.equal(got["weights"][name], master), (resumed, name, "model weights")
        if got["ema"] is not None:
            assert torch.equal(saved["ema"][name], got["ema"][name]), (resumed, name, "ema")
    for key in ("adam_step", "lr", "order", "samplers", "counters") + (("ema_decay",) if got["ema"] is not None
                                                                       else ()):
        assert saved[key] == got[key], (key, saved[key], got[key])
    assert saved["adam_step"] == 2 and saved["samplers"] == got["samplers"]
    assert (got["samplers"] == [None]) is source.startswith("full")  # full fine-tunes train without a list
    assert saved["counters"]["global_steps"] - saved["counters"]["skipped_steps"] == 2, saved["counters"]


def test_lora_two_ranks_to_one_continues_bit_exactly(out):
    assert_restored(out, "lora-w1", "lora-w2", "trainable")  # 1 -> 2 ranks
    assert torch.load(out / "lora-w1" / "saved-step2.pt", weights_only=False)["counters"]["skipped_steps"] == 1
    assert_restored(out, "lora-w2", "lora-back", "trainable")  # 2 -> 1 rank
    assert_continues(out, "lora-w1", "lora-back", LORA_FILES)
    meta = json.loads((out / "lora-w2" / "checkpoints" / "step-2" / "trainer.json").read_text())
    assert meta["layout"] == {"method": "flow", "family": "flux", "model": "tiny:flux", "model_type": "lora",
                              "lora": {"rank": 4, "alpha": 4.0, "targets": ["to_k", "to_out.0", "to_q", "to_v"]},
                              "anystep_embeddings": False, "zero_stage": 2, "world_size": 2, "dtype": "fp32",
                              "glance_phase_steps": None, "optimizer": "adamw"}
    assert TRAINABLE_FILE in meta["files"] and meta["ema_maps"] is True


@pytest.mark.parametrize("variant", ["", "-fused"])
def test_lora_at_stage0_bf16_saves_and_reshards_bit_exactly(out, variant):
    """Stage 0 with bf16 weights keeps fp32 copies in DeepSpeed's FP16 wrappers (per parameter, or one flat copy per
    group): a LoRA checkpoint gathers them (its save crashed on them), and they reshard to ZeRO-2 and back."""
    assert_restored(out, f"lora-z0-bf16{variant}", f"lora-z0-bf16{variant}-z2", "trainable")
    assert_restored(out, f"lora-z0-bf16{variant}-z2", f"lora-z2-z0-bf16{variant}", "trainable")
    assert_continues(out, f"lora-z0-bf16{variant}", f"lora-z2-z0-bf16{variant}", LORA_FILES)


def test_full_finetune_at_stage0_bf16_changes_world_size_natively(out):
    """Stage 0 keeps every rank's state whole (no partitioned optimizer files) in bf16 too: DeepSpeed's own load
    takes it on another world size (it was sent to the universal conversion, which found no ZeRO files)."""
    assert_restored(out, "full-z0-bf16-w1", "full-z0-bf16-w2", "native")
    assert_restored(out, "full-z0-bf16-w2", "full-z0-bf16-back", "native")
    assert_continues(out, "full-z0-bf16-w1", "full-z0-bf16-back", FULL_FILES)


def test_another_optimizer_carries_a_lora_over_and_refuses_a_full_finetune(out):
    """optimizer adamw -> deepspeed: DeepSpeed's own load crashed on the other optimizer's state (KeyError
    'bias_correction'; 'dynamic_loss_scale' at stage 0)."""
    assert_restored(out, "lora-w1", "lora-opt", "trainable")
    assert outcome(out, "lora-opt") == {"ok": {"step": 4, "preempted": False}}
    got = outcome(out, "full-opt")
    assert got["error"] == "ResumeMismatch" and "optimizer adamw -> deepspeed" in got["message"]
    assert "To continue it, resume with optimizer adamw" in got["message"] and "\n" not in got["message"]


def test_lora_at_stage0_two_ranks_to_one_takes_one_replica_of_the_ema(out):
    """At stage 0 every rank saves the whole EMA: resharding 2 -> 1 takes one rank's copy (it counted both and
    refused: 'the saved pieces cover 256 of the 128 elements')."""
    assert_restored(out, "lora-z0-bf16", "lora-z0-bf16-w2", "trainable")
    assert_restored(out, "lora-z0-bf16-w2", "lora-z0-bf16-back", "trainable")
    assert_continues(out, "lora-z0-bf16", "lora-z0-bf16-back", LORA_FILES)


def test_lora_zero2_to_zero3_continues_bit_exactly(out):
    assert_restored(out, "lora-z3", "lora-z3-z2", "trainable")  # ZeRO-3 -> ZeRO-2
    assert_restored(out, "lora-z3-z2", "lora-z2-z3", "trainable")  # ZeRO-2 -> ZeRO-3
    assert_continues(out, "lora-z3", "lora-z2-z3", LORA_FILES)
    assert_restored(out, "lora-z3-z2", "lora-z2-z3-noema", "trainable")  # persistent parameters re-gathered
    assert_continues(out, "lora-z3", "lora-z2-z3-noema", LORA_FILES[:1])


def test_full_finetune_two_ranks_to_one_within_a_stage(out):
    assert_restored(out, "full-w1", "full-w2", "universal")
    assert_restored(out, "full-w2", "full-back", "universal")
    assert_continues(out, "full-w1", "full-back", FULL_FILES)
    assert (out / "full-w2" / "checkpoints" / "step-2" / "universal" / "zero").is_dir()  # DeepSpeed's conversion
    assert (out / "full-w2" / "checkpoints" / "step-2" / "universal" / "conversion-complete").is_file()  # ours, last


@pytest.mark.parametrize("name", ["full-z3", "full-z3-bf16"])
def test_zero3_full_finetune_two_ranks_to_one(out, name):
    """The universal checkpoint of a ZeRO-3 full fine-tune (fp32, and bf16 weights with fp32 masters): 1 -> 2 -> 1
    ranks restores every master, moment and EMA partition bit for bit, and steps 3-4 equal the uninterrupted run's."""
    assert_restored(out, f"{name}-w1", f"{name}-w2", "universal")
    assert_restored(out, f"{name}-w2", f"{name}-back", "universal")
    assert_continues(out, f"{name}-w1", f"{name}-back", FULL_FILES)


def test_checkpoints_without_a_layout_record_still_resume(out):
    assert_restored(out, "lora-w1", "legacy-same", "native")
    assert_continues(out, "lora-w1", "legacy-same", LORA_FILES)
    assert_restored(out, "lora-w2", "legacy-back", "universal")  # an older LoRA checkpoint: universal, 2 -> 1
    assert_continues(out, "lora-w1", "legacy-back", LORA_FILES)


def test_changed_lora_rank_is_refused_by_name(out):
    got = outcome(out, "lora-rank")
    assert got["error"] == "ResumeMismatch"
    msg = got["message"]
    assert "lora_rank 4 -> 8" in msg and "lora_alpha 4.0 -> 8.0" in msg  # alpha defaults to the rank
    assert "(world size 2 -> 1 on its own would be resharded)" in msg
    assert "To continue it, resume with lora_rank 4, lora_alpha 4.0;" in msg
    assert "start a new run" in msg and "\n" not in msg
    many = outcome(out, "lora-many")["message"]
    for part in ("lora_rank 4 -> 8", "lora_alpha 4.0 -> 16.0", "lora_targets [to_k, to_out.0, to_q, to_v] -> "
                 "[to_k, to_q]", "mixed_precision fp32 -> bf16"):
        assert part in many, (part, many)
    assert not (out / "lora-rank" / "checkpoints").exists()  # refused before anything was written
    assert not (out / "lora-rank" / "data_digests.json").exists()  # and before the data scan (or the model load)


def test_changed_stage_of_a_full_finetune_is_refused_on_every_rank(out):
    got = outcome(out, "full-z3")
    assert got["error"] == "ResumeMismatch"
    assert "zero_stage 2 -> 3" in got["message"] and "resume with zero_stage 2" in got["message"]
    assert "zero_to_fp32.py" in got["message"]  # how to start again from the weights
    both = [outcome(out, "full-w2-z3", r) for r in (0, 1)]
    assert both[0] == both[1] and both[0]["error"] == "ResumeMismatch"
    assert "zero_stage 2 -> 3 (world size 1 -> 2 on its own would be resharded)" in both[0]["message"]


def test_full_disk_on_two_ranks_stops_both_alike_and_loses_nothing(out):
    """ENOSPC during a 2-rank save (free-space check off): no rank hangs in DeepSpeed's barrier, both raise the same
    CheckpointWriteError, step-2 and `latest` stay, the partial save is gone."""
    if not (out / "disk-full" / "outcome-rank0.json").exists():
        pytest.skip("no tmpfs could be mounted (needs root)")
    from fewstep import checkpoint

    both = [outcome(out, "disk-full", r) for r in (0, 1)]
    assert both[0] == both[1] and both[0]["error"] == "CheckpointWriteError", both
    assert both[0]["message"].startswith("checkpoint step-4 was not saved: rank ")
    assert "No space left on device. Nothing was lost: step-2 and `latest` are unchanged" in both[0]["message"]
    root = str(out / "disk-full" / "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step-2"]
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-2")
    assert [m["step"] for m in read_metrics(out / "disk-full")] == [1, 2, 3, 4]


def test_save_that_cannot_fit_is_not_started(out):
    if not (out / "disk-check" / "outcome-rank0.json").exists():
        pytest.skip("no tmpfs could be mounted (needs root)")
    from fewstep import checkpoint

    got = outcome(out, "disk-check")
    assert got["error"] == "CheckpointWriteError"
    assert got["message"].startswith("checkpoint step-4 was not started: it needs about "), got
    assert "(the size of step-2) but only " in got["message"] and "FEWSTEP_CHECKPOINT_SPACE_CHECK=0" in got["message"]
    root = str(out / "disk-check" / "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step-2"]  # nothing of step 4 was written
    assert checkpoint.resolve(root, "latest") == os.path.join(root, "step-2")


def test_universal_conversion_that_cannot_fit_says_so_and_leaves_the_checkpoint_as_it_was(out):
    """Resuming a 2-rank full fine-tune on 1 rank converts it to DeepSpeed's universal checkpoint beside it. With
    too little space there the conversion is not started (the free-space check) or, with the check off, fails half
    way: one error naming the space needed and the way out, and no converted or partial files are left."""
    if not (out / "disk-universal-check" / "outcome-rank0.json").exists():
        pytest.skip("no tmpfs could be mounted (needs root)")
    source = out / "full-w2" / "checkpoints" / "step-2"
    copy = out / "disk-universal" / "step-2"
    for name, reason in (("disk-universal-check", "it was not started: only "),
                         ("disk-universal-write", "[Errno 28] No space left on device (")):
        got = outcome(out, name)
        assert got["error"] == "UniversalConversionError", got
        message = got["message"]
        assert message.startswith(f"resuming {copy} (a full fine-tune saved on 2 ranks) on another world size needs "
                                  "DeepSpeed's universal checkpoint, about "), message
        assert reason in message and "Nothing was lost" in message and "resume on 2 ranks" in message, message
        assert not (out / name / "checkpoints").exists()  # nothing trained
    files = sorted(str(f.relative_to(copy)) for f in copy.rglob("*"))
    assert files == sorted(str(f.relative_to(source)) for f in source.rglob("*") if "universal" not in str(f))


def _converter_failing_with(monkeypatch, code: int, pointer: bool):
    """DeepSpeed's converter, replaced by one that writes part of its output and then fails with OSError `code`;
    `pointer`: while writing `latest_universal` beside the checkpoint's files, its last write."""
    from deepspeed.checkpoint import ds_to_universal

    def main(args):
        os.makedirs(os.path.join(args.output_folder, "zero", "x.weight"))
        torch.save({"param": torch.zeros(4)}, os.path.join(args.output_folder, "zero", "x.weight", "fp32.pt"))
        if pointer:
            open(os.path.join(os.path.dirname(args.output_folder), "latest_universal"), "w").close()
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ds_to_universal, "main", main)


def _saved_on_two_ranks(tmp_path):
    path = tmp_path / "step-2"
    (path / "state").mkdir(parents=True)
    for r in (0, 1):
        (path / "state" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 4096)
    (path / "trainer.json").write_text("{}")
    return path, sorted(str(f.relative_to(path)) for f in path.rglob("*"))


def test_a_conversion_failing_at_its_last_write_leaves_the_checkpoint_as_it_was(tmp_path, monkeypatch):
    """The converter writes its `latest_universal` pointer last, into the checkpoint's own folder: a full disk there
    left that (empty) file in the checkpoint the message calls unchanged."""
    from fewstep import reshard

    path, files = _saved_on_two_ranks(tmp_path)
    _converter_failing_with(monkeypatch, errno.ENOSPC, pointer=True)
    with pytest.raises(reshard.UniversalConversionError) as e:
        reshard.convert_universal(str(path), "state", 2)
    assert "[Errno 28] No space left on device" in str(e.value) and "Free some space and resume again" in str(e.value)
    assert sorted(str(f.relative_to(path)) for f in path.rglob("*")) == files


def test_a_read_only_checkpoint_folder_is_not_called_full(tmp_path, monkeypatch):
    """A conversion beside a checkpoint in a read-only folder (a shared or snapshot copy) said "Free some space"."""
    from fewstep import reshard

    path, files = _saved_on_two_ranks(tmp_path)
    _converter_failing_with(monkeypatch, errno.EROFS, pointer=False)
    with pytest.raises(reshard.UniversalConversionError) as e:
        reshard.convert_universal(str(path), "state", 2)
    message = str(e.value)
    assert "[Errno 30] Read-only file system" in message and "Free some space" not in message, message
    assert message.endswith("Make its folder writable and resume again, or resume from a copy of it in a writable "
                            "folder, or resume on 2 ranks, which needs no conversion"), message
    assert sorted(str(f.relative_to(path)) for f in path.rglob("*")) == files


# ---------------------------------------------------------------------------------------------------------------
# The plan alone (no DeepSpeed): which changes reshard, which are refused, and with what words
# ---------------------------------------------------------------------------------------------------------------

LAYOUT = {"family": "flux", "model": "tiny:flux", "model_type": "lora",
          "lora": {"rank": 4, "alpha": 4.0, "targets": ["to_k", "to_q"]}, "anystep_embeddings": False,
          "zero_stage": 2, "world_size": 2, "dtype": "bf16", "optimizer": "adamw"}
FILES = ["rank0.pt", "rank1.pt", TRAINABLE_FILE, "state/mp_rank_00_model_states.pt", "trainer.json"]


def meta(**layout):
    lay = {**LAYOUT, **layout}
    return {"layout": lay, "world_size": lay["world_size"], "zero_stage": lay["zero_stage"], "step": 4}


def new(**changes):
    return {**LAYOUT, **changes}


def test_plan_reshards_what_the_state_allows():
    p = plan("/c/step-4", meta(), new(), FILES, True, True, True)
    assert p.mode == "native" and p.note == ""
    p = plan("/c/step-4", meta(), new(world_size=8, zero_stage=3), FILES, True, True, True)
    assert (p.mode, p.changes, p.reshard_ema) == ("trainable", ["world size 2 -> 8", "zero_stage 2 -> 3"], True)
    full = dict(model_type="full", lora=None)
    p = plan("/c/step-4", meta(**full), new(**full, world_size=1), FILES[:2], True, True, True)
    assert p.mode == "universal"
    p = plan("/c/step-4", meta(**full, zero_stage=0, dtype="fp32"),
             new(**full, zero_stage=0, dtype="fp32", world_size=4), FILES[:2], True, True, False)
    assert p.mode == "native"  # stage-0 fp32 state is not partitioned
    p = plan("/c/step-4", meta(**full, zero_stage=0), new(**full, zero_stage=0, world_size=4), FILES[:2], True, True,
             False)
    assert p.mode == "native" and p.note == " (world size 2 -> 4: stage-0 state is not partitioned)"  # bf16 too
    partitioned = FILES[:2] + ["state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]  # DeepSpeed's BF16 optimizer
    assert plan("/c/step-4", meta(**full, zero_stage=0), new(**full, zero_stage=0, world_size=4), partitioned, True,
                True, False).mode == "universal"
    # another optimizer: a LoRA through trainable.pt (also from a record that does not name its optimizer)
    p = plan("/c/step-4", meta(), new(optimizer="deepspeed"), FILES, True, True, True)
    assert (p.mode, p.changes) == ("trainable", ["optimizer adamw -> deepspeed"])
    unnamed = meta()
    del unnamed["layout"]["optimizer"]
    assert plan("/c/step-4", unnamed, new(optimizer="deepspeed"), FILES, True, True, True).mode == "native"
    # a checkpoint from before the record: only world size and stage are known
    old = {"world_size": 2, "zero_stage": 2, "step": 4}
    assert plan("/c/step-4", old, new(lora={"rank": 64, "alpha": 1.0, "targets": ["x"]}), FILES[:2], True, False,
                False).mode == "native"
    assert plan("/c/step-4", old, new(world_size=1), FILES[:2], False, False, True).mode == "universal"


def test_plan_refusals_name_every_key_and_the_way_on():
    with pytest.raises(ResumeMismatch) as err:
        plan("/c/step-4", meta(), new(family="sd3", model="tiny:sd3", anystep_embeddings=True, world_size=1),
             FILES, True, True, True)
    msg = str(err.value)
    assert ("model_family flux -> sd3, pretrained_model_name_or_path tiny:flux -> tiny:sd3, any-step embeddings "
            "(method twinflow) False -> True (world size 2 -> 1 on its own would be resharded)") in msg
    assert "To continue it, resume with model_family flux, pretrained_model_name_or_path tiny:flux" in msg
    full = dict(model_type="full", lora=None)
    with pytest.raises(ResumeMismatch, match=r"zero_stage 2 -> 1\. A full fine-tune's optimizer state"):
        plan("/c/step-4", meta(**full), new(**full, zero_stage=1), FILES[:2], True, True, True)
    with pytest.raises(ResumeMismatch, match=r"optimizer adamw -> deepspeed\. A full fine-tune's optimizer state is "
                                             r"saved in its optimizer's own format.* resume with optimizer adamw"):
        plan("/c/step-4", meta(**full), new(**full, optimizer="deepspeed"), FILES[:2], True, True, True)
    with pytest.raises(ResumeMismatch) as err:  # both refusals at once, neither called "would be resharded"
        plan("/c/step-4", meta(**full), new(**full, optimizer="deepspeed", zero_stage=3), FILES[:2], True, True, True)
    msg = str(err.value)
    assert "optimizer adamw -> deepspeed, zero_stage 2 -> 3. " in msg and "would be resharded" not in msg, msg
    assert "resume with optimizer adamw, zero_stage 2" in msg and "to continue with optimizer deepspeed, export" in msg
    with pytest.raises(ResumeMismatch, match=r"optimizer adamw -> deepspeed\. This LoRA checkpoint was written before "
                                             r"fewstep saved an optimizer-independent copy"):
        plan("/c/step-4", meta(), new(optimizer="deepspeed"), FILES[:2], True, True, True)  # no trainable.pt
    with pytest.raises(ResumeMismatch, match=r"optimizer adamw -> deepspeed\. Its EMA partitions"):
        plan("/c/step-4", meta(), new(optimizer="deepspeed"), FILES, True, False, True)  # EMA without its maps
    with pytest.raises(ResumeMismatch, match="model_type lora -> full"):
        plan("/c/step-4", meta(), new(**full), FILES, True, True, True)
    # another method: said as such (a flow run resumed as Glance named only the phase length and alpha)
    with pytest.raises(ResumeMismatch, match=r"method flow -> glance, max_train_steps \(Glance: per phase\) none -> 3"):
        plan("/c/step-4", meta(method="flow", glance_phase_steps=None), new(method="glance", glance_phase_steps=3),
             FILES, True, True, True)
    old = {"world_size": 2, "zero_stage": 2, "step": 4}
    with pytest.raises(ResumeMismatch, match=r"zero_stage 2 -> 3\. .*before fewstep saved a stage-independent.*"
                                             r"predates the layout record"):
        plan("/c/step-4", old, new(zero_stage=3), FILES[:2], False, False, False)
    with pytest.raises(ResumeMismatch, match=r"world size 2 -> 1\. Its EMA partitions .* resume on 2 rank"):
        plan("/c/step-4", old, new(world_size=1), FILES[:2], True, False, True)
    # the same checkpoint without an EMA in it: nothing to reshard, the EMA starts from the restored weights
    assert plan("/c/step-4", old, new(world_size=1), FILES[:2], False, False, True).mode == "universal"


def test_a_glance_checkpoint_keeps_its_phase_length():
    """Glance's step places a checkpoint's LoRA in Slow or Fast by the max_train_steps it was written with: another
    length (which would train the finished Fast LoRA as Slow and export it over Slow's), or another method, is
    refused; a one-phase run may raise max_train_steps (no record), and an older record without the key resumes."""
    glance = dict(glance_phase_steps=6)
    assert plan("/c/step-4", meta(**glance), new(**glance), FILES, True, True, True).mode == "native"
    with pytest.raises(ResumeMismatch) as err:
        plan("/c/step-4", meta(**glance), new(glance_phase_steps=20), FILES, True, True, True)
    msg = str(err.value)
    assert "max_train_steps (Glance: per phase) 6 -> 20. Glance trains Slow for max_train_steps steps" in msg, msg
    assert "resume with max_train_steps (Glance: per phase) 6" in msg and "start a new run" in msg
    assert "another model" not in msg
    with pytest.raises(ResumeMismatch, match=r"per phase\) none -> 6"):  # a flow checkpoint continued as Glance
        plan("/c/step-4", meta(glance_phase_steps=None), new(**glance), FILES, True, True, True)
    one_phase = dict(glance_phase_steps=None)
    assert plan("/c/step-4", meta(**one_phase), new(**one_phase), FILES, True, True, True).mode == "native"
    assert plan("/c/step-4", meta(), new(**glance), FILES, True, True, True).mode == "native"  # older record
