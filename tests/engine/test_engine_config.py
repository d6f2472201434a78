"""The generated DeepSpeed config after a user's `deepspeed_config` is merged (no process group needed), and the swap's
guard against overwriting the fp32 masters (fake optimizers exposing DeepSpeed's attribute layout)."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from fewstep.config import ConfigError, load_config
from fewstep.engine.deepspeed_engine import build_ds_config, weights_swapped_in
from fewstep_testing import REPO


def ds_config(tmp_path, user=None, **overrides):
    opts = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", **overrides}
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        opts["deepspeed_config"] = str(path)
    return build_ds_config(load_config(None, opts))


def test_persistent_parameters_refused_with_an_ema_teacher(tmp_path):
    user = {"zero_optimization": {"stage3_param_persistence_threshold": 1e4}}
    with pytest.raises(ConfigError) as e:
        ds_config(tmp_path, user, zero_stage=3, use_ema=True)
    msg = str(e.value)
    assert str(tmp_path / "ds.json") in msg and "zero_optimization.stage3_param_persistence_threshold" in msg
    assert "persist" in msg and "EMA" in msg
    ds_config(tmp_path, user, zero_stage=3, use_ema=False)  # no swap: persistence is the user's choice
    ds_config(tmp_path, user, zero_stage=2, use_ema=True)  # stage 2 has no persistent parameters


def test_nothing_persists_is_accepted(tmp_path):
    z = ds_config(tmp_path, {"zero_optimization": {"stage3_param_persistence_threshold": 0}}, zero_stage=3,
                  use_ema=True)["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == 0
    # a model-wide budget of 0 persists nothing either (DeepSpeed skips a parameter that would exceed it)
    ds_config(tmp_path, {"zero_optimization": {"stage3_param_persistence_threshold": 1e4,
                                               "stage3_model_persistence_threshold": 0}}, zero_stage=3, use_ema=True)


def test_stage3_from_the_deepspeed_config_gets_the_stage3_defaults(tmp_path):
    """configs/deepspeed/zero3.json sets stage 3 while zero_stage stays at its default 2: with an EMA teacher the
    generated config must still persist nothing (it used to leave DeepSpeed's default 1e5)."""
    cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", "use_ema": True,
                             "deepspeed_config": os.path.join(REPO, "configs", "deepspeed", "zero3.json")})
    z = build_ds_config(cfg)["zero_optimization"]
    assert cfg.zero_stage == 2 and z["stage"] == 3
    assert z["stage3_param_persistence_threshold"] == 0


def test_hpz_secondary_partitions_refused_with_an_ema_teacher(tmp_path):
    user = {"zero_optimization": {"zero_hpz_partition_size": 2}}
    with pytest.raises(ConfigError, match="zero_hpz_partition_size is 2"):
        ds_config(tmp_path, user, zero_stage=3, use_ema=True)
    ds_config(tmp_path, user, zero_stage=3)
    # quantized all-gathers quantize the (swapped) shard at every gather: allowed
    ds_config(tmp_path, {"zero_optimization": {"zero_quantized_weights": True}}, zero_stage=3, use_ema=True)


@pytest.mark.parametrize("key, why", [("offload_param", "the weights would stay randomly initialised"),
                                      ("offload_optimizer", "the non-finite check of every step reads the gradients")])
def test_nvme_offload_is_refused(tmp_path, key, why):
    """DeepSpeed 0.19 keeps an NVMe-offloaded partition in memory as a 1-element placeholder: the ZeRO-3 load would
    write the pretrained weights into placeholders (a random base, silently), and the per-step non-finite check
    cannot read gradients kept on the drive (a NotImplementedError at step 1, after the cache fill and the load).
    Refused before anything loads, with or without an EMA; at stages where DeepSpeed ignores the offload, not."""
    user = {"zero_optimization": {key: {"device": "nvme", "nvme_path": str(tmp_path)}}}
    for use_ema in (True, False):
        with pytest.raises(ConfigError, match=rf"{key}.device nvme \(ZeRO-Infinity\) is not supported: .*{why}"):
            ds_config(tmp_path, user, zero_stage=3, use_ema=use_ema)
    if key == "offload_param":
        ds_config(tmp_path, user, zero_stage=2)  # below stage 3 DeepSpeed ignores it (a warning)


@pytest.mark.parametrize("user, key", [
    ({"checkpoint": {"writer": {"type": "fast", "decoupled": True}}}, "checkpoint.writer"),
    ({"checkpoint": {"use_node_local_storage": True}}, "checkpoint.use_node_local_storage"),
    ({"checkpoint": {"load_universal": True}}, "checkpoint.load_universal"),
    ({"datastates_ckpt": {"host_cache_size": 16}}, "datastates_ckpt")])
def test_deepspeed_checkpoint_writers_are_refused(tmp_path, user, key):
    """An asynchronous or parallel writer would let fewstep commit a checkpoint whose files are not all written."""
    with pytest.raises(ConfigError, match=f"{key} is not supported"):
        ds_config(tmp_path, user)
    ds_config(tmp_path, {"checkpoint": {"tag_validation": "FAIL", "use_node_local_storage": False}})


@pytest.mark.parametrize("user, overrides, message", [
    ({"zero_optimisation": {"stage": 3}}, {}, "unknown key 'zero_optimisation'; did you mean 'zero_optimization'"),
    ({"zero_optimization": {"stage": 5}}, {}, "zero_optimization.stage must be 0, 1, 2 or 3, got 5"),
    ({"zero_optimization": {"overlap_comm": "maybe"}}, {}, "zero_optimization.overlap_comm: Input should be a valid "
                                                            "boolean"),
    ({"bf16": {"enabled": True}}, {"mixed_precision": "fp32"}, "bf16.enabled is True, but mixed_precision is fp32"),
    ({"bf16": {"enabled": False}}, {}, "bf16.enabled is False, but mixed_precision is bf16"),
    ({"fp16": {"enabled": True}}, {}, "fp16.enabled is not supported: fewstep trains in bf16 or fp32")])
def test_mistakes_deepspeed_would_meet_after_the_model_load_are_refused_first(tmp_path, user, overrides, message):
    """A misspelt section (DeepSpeed ignores it), a ZeRO value DeepSpeed rejects only in `initialize`, and a precision
    section against mixed_precision (it failed at the first step, or trained in another precision)."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ds_config(tmp_path, user, **overrides)
    ds_config(tmp_path, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "overlap_comm": False}})


def test_offload_optimizer_needs_a_zero_stage(tmp_path):
    """At stage 0 DeepSpeed ignores the offload for torch AdamW, and with optimizer deepspeed steps DeepSpeedCPUAdam
    on the parameters wherever they are (a CUDA parameter fails at the first step)."""
    for optimizer in ("adamw", "deepspeed"):
        with pytest.raises(ConfigError, match="'offload_optimizer'.*zero_stage 1, 2 or 3"):
            ds_config(tmp_path, zero_stage=0, offload_optimizer=True, optimizer=optimizer)
    with pytest.raises(ConfigError, match="offload_optimizer"):  # stage 0 set by the user's file
        ds_config(tmp_path, {"zero_optimization": {"stage": 0}}, zero_stage=2, offload_optimizer=True)
    for stage in (1, 2, 3):
        z = ds_config(tmp_path, zero_stage=stage, offload_optimizer=True)["zero_optimization"]
        assert z["offload_optimizer"]["device"] == "cpu"


def test_a_partial_optimizer_offload_is_refused_at_stage_3(tmp_path):
    """ZeRO-3's partial offload (ratio < 1) steps the GPU part with DeepSpeed's `backup_optimizer`, outside the LR
    schedule and the checkpoints. DeepSpeed's own validation refuses it at stages 1 and 2; ratio 1 is the plain
    offload."""
    partial = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 0.3}}}
    with pytest.raises(ConfigError, match=r"offload_optimizer.ratio 0.3 \(a partial offload\) is not supported.*"
                                          r"LR schedule does not reach"):
        ds_config(tmp_path, partial, zero_stage=3)
    for stage in (1, 2):
        with pytest.raises(ConfigError, match=r"ds.json: zero_optimization: Assertion failed, Partial offloading only"):
            ds_config(tmp_path, partial, zero_stage=stage)
    whole = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 1.0}}}
    assert ds_config(tmp_path, whole, zero_stage=3)["zero_optimization"]["stage"] == 3


# ---------------------------------------------------------------------------------------------------------------
# The alias guard of `weights_swapped_in`
# ---------------------------------------------------------------------------------------------------------------

def zero3(masters, shards):
    """DeepSpeedZeroOptimizer_Stage3's layout: fp32 partitions and the bf16 shards the model gathers from."""
    return SimpleNamespace(optimizer=SimpleNamespace(fp32_partitioned_groups_flat=masters,
                                                     fp16_partitioned_groups_flat=shards))


def test_swap_refuses_a_shard_that_shares_storage_with_a_master():
    master = torch.arange(8, dtype=torch.float32)
    kept = master.clone()
    for shard in (master, master[4:], master.view(2, 4)):  # the master itself, a view of part of it, a reshape
        with pytest.raises(RuntimeError, match="shares storage with a fp32 master"):
            with weights_swapped_in(zero3([master], [shard]), [torch.full((8,), -1.0)]):
                pytest.fail("the body must not run")
        assert torch.equal(master, kept)


def test_swap_refuses_a_shard_that_shares_storage_with_the_replacement():
    master, shard = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    with pytest.raises(RuntimeError, match="shares storage with the replacement"):
        with weights_swapped_in(zero3([master], [shard]), [shard]):
            pass


def test_swap_refuses_a_regathered_buffer_that_shares_storage_with_a_master():
    """ZeRO-1/2: the swap re-points the master and DeepSpeed's `update_lp_params` writes the model's flat buffer;
    if that buffer were the master's storage, the saved master would be overwritten with the replacement."""
    master = torch.arange(8, dtype=torch.float32)
    kept, calls = master.clone(), []
    opt = SimpleNamespace(single_partition_of_fp32_groups=[master], bit16_groups_flat=[master],
                          update_lp_params=lambda: calls.append(1))
    with pytest.raises(RuntimeError, match="shares storage with a fp32 master"):
        with weights_swapped_in(SimpleNamespace(optimizer=opt), [torch.full((8,), -1.0)]):
            pass
    assert calls == [] and torch.equal(master, kept)


def test_swap_with_separate_storage_writes_and_restores():
    """The guard's control: separate buffers (the real ZeRO-3 layout) swap in and back."""
    master, shard = torch.arange(8, dtype=torch.float32), torch.arange(8, dtype=torch.float32).bfloat16()
    empty = torch.empty(0)  # e.g. an NVMe-swapped sub-group: no storage, never an alias
    with weights_swapped_in(zero3([master, empty], [shard, torch.empty(0).bfloat16()]),
                            [torch.full((8,), -1.0), empty]):
        assert torch.equal(shard, torch.full((8,), -1.0).bfloat16())
    assert torch.equal(shard, master.bfloat16()) and torch.equal(master, torch.arange(8, dtype=torch.float32))


@pytest.mark.parametrize("n,piece", [(1000, 64), (1000, 1000), (7, 3), (1, 4)])
def test_a_copy_in_pieces_equals_a_whole_copy(n, piece):
    """The swap's host -> device path under offload_optimizer (fp32 masters or EMA into the bf16 shards), piece by
    piece: pieces that do not divide the size included. On CPU both sides are host tensors; the CUDA test below
    crosses devices."""
    from fewstep.engine.deepspeed_engine import copy_in_pieces

    src = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3 + 0.1
    got, want = torch.full((n,), float("nan"), dtype=torch.bfloat16), src.to(torch.bfloat16)
    copy_in_pieces(got, src, piece)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="elements"):
        copy_in_pieces(got, src[:-1] if n > 1 else torch.zeros(2), piece)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swap_from_pinned_host_memory_into_device_shards_on_cuda(monkeypatch):
    """offload_optimizer's layout: fp32 masters and replacement pinned in host memory, bf16 shards on the GPU; a piece
    smaller than the shard crosses the device boundary several times; values equal torch's whole-tensor cast."""
    from fewstep.engine import deepspeed_engine

    n = 3 * 1000 + 17
    master = torch.randn(n, generator=torch.Generator().manual_seed(0)).pin_memory()
    new = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 2).pin_memory()
    shard = master.to("cuda", torch.bfloat16)
    monkeypatch.setattr(deepspeed_engine, "STAGING_ELEMENTS", 1000)
    with weights_swapped_in(zero3([master], [shard]), [new]):
        assert torch.equal(shard.cpu(), new.to(torch.bfloat16))
    assert torch.equal(shard.cpu(), master.to(torch.bfloat16))
    from fewstep.ema import EMA  # an EMA of pinned masters is pinned too: its pieces go over asynchronously
    assert EMA([master], 0.9).shadow[0].is_pinned()
