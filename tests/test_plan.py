"""The memory planner (fewstep.planning, launcher/plan.py).

- the shipped architectures have the published parameter counts (built on the meta device), SDXL's UNet included;
- LoRA counted analytically equals what peft adds;
- model-state bytes agree with DeepSpeed's own estimators, up to conventions explained at the test;
- activation estimates and whole-layout totals agree within 15% with the RSS measured on CPU: real forward/backward
  passes, and real DeepSpeed ZeRO-2/3 training (torchrun, 2 ranks, gloo, client torch AdamW, fewstep's engine);
- the CLI prints the table and a recommendation for Qwen-Image LoRA and full fine-tuning on 1, 8 and 32 GPUs, and for
  SDXL TwinFlow LoRA (configs/twinflow/sdxl_lora.json) on 1 and 8 GPUs.
"""
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.planning import (GiB, LAYOUTS, AnyStep, ParamCounts, ZeroKnobs, build_meta_transformer, count_params,
                              format_table, layout_memory, load_model_config, lora_param_count, plan_memory,
                              resolve_model_config)
from fewstep.planning.host import host_buffers, host_bytes, pinned_limits
from fewstep.planning.model import MODEL_CONFIG_DIR
from fewstep_testing import load_launcher, run

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {"qwen_image.json": 20.430, "flux_dev.json": 11.901, "sd35_large.json": 8.057,  # billions of parameters
             "sdxl.json": 2.567}
FAMILY = {"qwen_image.json": "qwen_image", "flux_dev.json": "flux", "sd35_large.json": "sd3", "sdxl.json": "sdxl"}
SDXL_UNET_PARAMS = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0 unet, as published
# a "medium" FLUX transformer (28.2M parameters) and a tiny one with the same module graph (34K parameters)
MEDIUM = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 2,
          "num_single_layers": 2, "attention_head_dim": 64, "num_attention_heads": 8, "joint_attention_dim": 256,
          "pooled_projection_dim": 128, "axes_dims_rope": [16, 24, 24]}
TINY = dict(MEDIUM, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=[2, 2, 4])
NARROW = dict(MEDIUM, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32)  # activation-bound
# SDXL's UNet layout (3 levels, no attention at the first, text_time added conditioning) at toy width
SMALL_UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
              "block_out_channels": [32, 64, 128], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 3],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              "attention_head_dim": [2, 4, 8], "cross_attention_dim": 64, "use_linear_projection": True,
              "norm_num_groups": 8, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 32}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the SDXL adapter's default LoRA targets


def cfg(**kw):
    base = {"model_family": "flux", "model_type": "full", "pretrained_model_name_or_path": "tiny:flux"}
    return {**base, **kw}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    """The shipped configs name their data backend relative to the repository root, and the planner reads it (as the
    trainer does) relative to the working directory."""
    monkeypatch.chdir(ROOT)


# ------------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_have_published_sizes(name):
    model = build_meta_transformer(load_model_config(MODEL_CONFIG_DIR / name))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9, 3) == PUBLISHED[name]
    # the family's default architecture is the shipped one
    assert resolve_model_config(FAMILY[name], "some/hub-id") == load_model_config(MODEL_CONFIG_DIR / name)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_lora_count_equals_peft(name):
    from peft import LoraConfig

    from fewstep.models import get_adapter

    targets = list(get_adapter(FAMILY[name]).default_lora_targets)
    model = build_meta_transformer(load_model_config(MODEL_CONFIG_DIR / name))
    for child, blocks in list(model.named_children()):  # two blocks per list keep peft fast; shapes are the real ones
        if isinstance(blocks, torch.nn.ModuleList):
            setattr(model, child, torch.nn.ModuleList(list(blocks)[:2]))
    expected = lora_param_count(model, targets, rank=64)
    base = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    with torch.device("meta"):
        model.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=targets))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(p.numel() for p in model.parameters()) == base + expected


def test_sdxl_unet_has_the_published_size():
    model = build_meta_transformer(load_model_config(MODEL_CONFIG_DIR / "sdxl.json"))
    assert type(model).__name__ == "UNet2DConditionModel"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(SDXL_UNET_PARAMS, rel=1e-3)


def _sdxl_lora_by_hand(r: int) -> int:
    """LoRA on SDXL's attention projections, r * (in + out) each. A BasicTransformerBlock of width d has a
    self-attention (q, k, v, out: d -> d) and a cross-attention (q, out: d -> d; k, v: 2048 text -> d):
    8d + 4d + 2 (2048 + d) = 14d + 4096 per rank. Blocks: width 640 (level 1): 2 down + 3 up attentions x 2 deep;
    width 1280 (level 2): 2 down + 1 mid + 3 up attentions x 10 deep. Convolutions are not targeted."""
    per = lambda d: 14 * d + 2 * 2048  # noqa: E731
    return r * ((2 + 3) * 2 * per(640) + (2 + 1 + 3) * 10 * per(1280))


def test_sdxl_lora_and_anystep_counts():
    from fewstep.planning import anystep_dim, anystep_param_count

    mc = load_model_config(MODEL_CONFIG_DIR / "sdxl.json")
    meta = build_meta_transformer(mc)
    linears = [(n, m) for n, m in meta.named_modules() if n.endswith(tuple("." + t for t in UNET_TARGETS))]
    assert len(linears) == 70 * 8 and all(isinstance(m, torch.nn.Linear) for _, m in linears)
    n_lora = lora_param_count(meta, UNET_TARGETS, rank=64)
    assert n_lora > 0 and n_lora == _sdxl_lora_by_hand(64) == 64 * sum(m.in_features + m.out_features
                                                                        for _, m in linears)
    # TwinFlow's any-step embedding on a UNet is as wide as its time embedding (1280), not heads x head dim:
    # nn.Embedding(2, D) + Linear(256, D) + Linear(D, D)
    D = 1280
    assert anystep_dim(meta) == meta.time_embedding.linear_2.out_features == D
    assert anystep_param_count(meta) == 2 * D + (256 * D + D) + (D * D + D)
    plan = plan_memory(ROOT / "configs" / "twinflow" / "sdxl_lora.json", gpus=8)
    c = plan.counts
    assert c.trainable == _sdxl_lora_by_hand(64) + 2 * D + 257 * D + (D + 1) * D
    assert c.total == sum(p.numel() for p in meta.parameters()) + c.trainable and c.frozen == meta.num_parameters()
    assert plan.settings["text_tokens"] == 77  # CLIP's length, whatever the adapter's T5-style default_text_len
    full = plan_memory({**json.loads((ROOT / "configs" / "twinflow" / "sdxl_lora.json").read_text()),
                        "model_type": "full"}, gpus=8).counts
    assert full.trainable == full.total == meta.num_parameters() + anystep_param_count(meta)
    # a model_config of another class than the family's: the planner sizes the embedding itself (no adapter hook)
    other = plan_memory(cfg(model_type="lora", lora_rank=64, lora_targets=UNET_TARGETS, method="twinflow",
                            resolution=1024, use_ema=True), gpus=8, model_config=mc, text_tokens=77).counts
    assert (other.total, other.trainable) == (c.total, c.trainable)


def test_unet_activations_traced_on_meta():
    """SDXL's UNet forward runs on meta tensors of the real shapes; its blocks are the units diffusers' gradient
    checkpointing recomputes: every ResnetBlock2D and every BasicTransformerBlock."""
    from fewstep.planning import model_activations
    from fewstep.planning.activations import MODEL_INPUTS, block_lists, default_text_tokens

    mc = load_model_config(MODEL_CONFIG_DIR / "sdxl.json")
    meta = build_meta_transformer(mc)
    with torch.device("meta"):
        inputs = MODEL_INPUTS["UNet2DConditionModel"][0](meta.config, 2, 1024 // 16, 77, torch.bfloat16)
    assert inputs["sample"].shape == (2, 4, 128, 128) and inputs["timestep"].shape == (2,)
    assert inputs["encoder_hidden_states"].shape == (2, 77, 2048)
    assert {k: tuple(v.shape) for k, v in inputs["added_cond_kwargs"].items()} == {"text_embeds": (2, 1280),
                                                                                    "time_ids": (2, 6)}
    assert default_text_tokens("UNet2DConditionModel", 512) == 77
    lists = block_lists(meta)
    resnets = [n for n, cut in lists if n.endswith("resnets") and not cut]
    blocks = [n for n, cut in lists if n.endswith("transformer_blocks") and cut]
    assert len(resnets) + len(blocks) == len(lists) and len(resnets) == 3 + 1 + 3 and len(blocks) == 2 + 2 + 1 + 3 + 3
    assert sum(len(meta.get_submodule(n)) for n in blocks) == 70
    assert sum(len(meta.get_submodule(n)) for n in resnets) == 2 * 3 + 2 + 3 * 3
    one, two = (model_activations(mc, batch=b, resolution=1024, text_tokens=77, dtype=torch.bfloat16)
                for b in (1, 2))
    assert len(one.lists) == len(lists) and sum(n for n, _, _ in one.lists) == 70 + 17
    assert 0 < one.saved(True) < one.saved(False) and one.peak(True) < one.peak(False)
    assert two.saved(False) == pytest.approx(2 * one.saved(False), rel=0.01)  # activations scale with the batch
    lora = model_activations(mc, batch=1, resolution=1024, text_tokens=77, dtype=torch.bfloat16,
                             lora_targets=tuple(UNET_TARGETS), lora_rank=64, anystep=AnyStep("sdxl"))
    assert lora.saved(True) < one.saved(True) and lora.working > lora.block  # frozen layers save less


def test_counts_lora_full_and_twinflow_embeddings():
    from fewstep.models.anystep import AnyStepEmbedding

    mc = load_model_config(MODEL_CONFIG_DIR / "qwen_image.json")
    kw = dict(gpus=8, model_config=mc, text_tokens=64)
    full = plan_memory(cfg(model_family="qwen_image", resolution=256), **kw).counts
    lora = plan_memory(cfg(model_family="qwen_image", model_type="lora", lora_rank=64, resolution=256), **kw).counts
    assert full.trainable == full.total and round(full.total / 1e9, 3) == 20.430
    assert lora.total == full.total + lora.trainable and lora.frozen == full.total
    # by hand: 60 dual-stream blocks of width d = 3072; per block 8 attention projections d -> d (q, k, v, out for
    # the image and the text stream), 2 MLP down-projections 4d -> d, 2 modulations d -> 6d; r * (in + out) each
    d = 3072
    assert lora.trainable == 60 * 64 * (8 * (d + d) + 2 * (4 * d + d) + 2 * (d + 6 * d))
    twin = plan_memory(cfg(model_family="qwen_image", model_type="lora", lora_rank=64, resolution=256,
                           method="twinflow", use_ema=True), **kw).counts
    with torch.device("meta"):
        anystep = sum(p.numel() for p in AnyStepEmbedding(24 * 128, 1.0).parameters())
    assert twin.trainable == lora.trainable + anystep and twin.total == lora.total + anystep


# ------------------------------------------------------------------------------- DeepSpeed's own estimators
def _ds_printed(fn, *args):
    """Rows printed by a DeepSpeed `*_all_cold` estimator: {options: (cpu GiB, gpu GiB)} (it prints 2**30 'GB')."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    rows = {}
    for line in out.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if m:
            opts = tuple(re.findall(r"(offload_\w+)=(\S*?)(?:,|$)", m.group(3)))
            zi = re.search(r"zero_init=(\d)", m.group(3))
            key = tuple((k, "cpu" in v) for k, v in opts) + ((("zero_init", zi.group(1) == "1"),) if zi else ())
            rows[key] = (float(m.group(1)), float(m.group(2)))
    return rows


@pytest.mark.parametrize("gpn,nodes", [(1, 1), (4, 1), (8, 1), (8, 4)])
def test_model_states_agree_with_deepspeed_estimators(gpn, nodes):
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_cold)

    meta = build_meta_transformer(load_model_config(MODEL_CONFIG_DIR / "flux_dev.json"))
    c = count_params(meta, lora=False)
    P, LL, n = c.total, c.largest_module, gpn * nodes
    c = ParamCounts(P, P, 0, 0, LL)  # DeepSpeed counts parameters only: no buffers, no persistent small params
    # DeepSpeed's estimators assume its fused Adam (no temporaries); its working set for the largest layer is
    # 4*LL = bf16 weights + bf16 grads: here a gathered window of exactly that layer and a reduce bucket of its size
    knobs = ZeroKnobs(reduce_bucket_size=LL, max_live_parameters=0, prefetch_bucket_size=0, fused_adam=True,
                      param_persistence_threshold=0)

    def lay(stage, opt=False, par=False):
        return layout_memory(c, 0.0, stage=stage, offload_optimizer=opt, offload_param=par, gpus=n, nodes=nodes,
                             bf16=True, knobs=knobs)

    def close(ours, ds_bytes, ds_printed_gib):
        assert ours == pytest.approx(ds_bytes, rel=1e-9, abs=2)  # exact up to DeepSpeed's int()
        assert abs(ours / GiB - ds_printed_gib) <= 0.006  # the printed table rounds to 0.01 GiB

    def states_on_host(stage, opt=False, par=False):
        """Host bytes per node of what DeepSpeed's estimators count (masters, fp32 grads, Adam, the bf16 weight
        partition) at their exact sizes: ours adds pinned rounding, EMA, staging buffers and step temporaries."""
        bufs = host_buffers(c, stage=stage, offload_optimizer=opt, offload_param=par, n=n, w=2, ema=False, knobs=knobs)
        kept = [b for b in bufs if b[0] in ("fp32 master", "fp32 grads", "Adam m, v", "trainable params")]
        return host_bytes(kept, knobs, exact=True) * gpn

    z2 = _ds_printed(estimate_zero2_model_states_mem_needs_all_cold, P, gpn, nodes)
    # ZeRO-2, no offload. DeepSpeed: 2P + 18P/N, 18 = 2 bf16 grads + 4 fp32 grads + 4 master + 8 Adam. Ours at the
    # optimizer step: params 2P + optim 12P/N + step (bf16 grad partition 2P/N + its fp32 copy 4P/N). Exact.
    ours = lay(2).params + lay(2).optim + lay(2).step
    close(ours, estimate_zero2_model_states_mem_needs(P, gpn, nodes, cpu_offload=False)[1],
          z2[(("offload_optimizer", False),)][1])
    # ZeRO-2 + optimizer offload: the GPU keeps the bf16 weights (2P). DeepSpeed's host figure is
    # P * max(4 * N, 16) * 1.5: 16 B/param of fp32 grads, master and Adam per node (ours, steady state) against
    # 4 B/param of a full fp32 model each process loads before partitioning (init-time, not modelled), times
    # DeepSpeed's 1.5 buffer factor. They agree while 16 >= 4 * N, i.e. one node of <= 4 GPUs.
    off = lay(2, opt=True)
    cpu_ds, gpu_ds = estimate_zero2_model_states_mem_needs(P, gpn, nodes, cpu_offload=True)
    close(off.params + off.optim + off.step, gpu_ds, z2[(("offload_optimizer", True),)][1])
    if 4 * n <= 16 and nodes == 1:
        close(states_on_host(2, opt=True) * 1.5, cpu_ds, z2[(("offload_optimizer", True),)][0])
    else:
        assert cpu_ds == pytest.approx(4 * n * P * 1.5, rel=1e-9) and cpu_ds > states_on_host(2, opt=True) * 1.5

    z3 = _ds_printed(estimate_zero3_model_states_mem_needs_all_cold, P, LL, gpn, nodes)
    key = lambda par, opt: (("offload_param", par), ("offload_optimizer", opt), ("zero_init", True))  # noqa: E731
    # ZeRO-3, no offload. DeepSpeed: 4*LL + 18P/N, the ZeRO-2 18 bytes (grads, fp32 grads, master, Adam) without
    # the bf16 weight partition 2P/N, which its offload formula below does add. Ours: 4*LL (gathered layer 2*LL in
    # params, reduce bucket 2*LL in step) + 20P/N. Convention: ours - 2P/N == DeepSpeed.
    z = lay(3)
    ours = z.params + z.optim + z.step - 2 * P / n
    cpu_ds, gpu_ds, _ = estimate_zero3_model_states_mem_needs(P, LL, gpn, nodes, cpu_offload=False,
                                                              cpu_offload_params=False)
    close(ours, gpu_ds, z3[key(False, False)][1])
    # ZeRO-3 + optimizer offload: GPU 4*LL + 2P/N; host 16 B/param per node (x 1.5). Exact, for what it counts.
    z = lay(3, opt=True)
    cpu_ds, gpu_ds, _ = estimate_zero3_model_states_mem_needs(P, LL, gpn, nodes, cpu_offload=True,
                                                              cpu_offload_params=False)
    close(z.params + z.optim + z.step, gpu_ds, z3[key(False, True)][1])
    close(states_on_host(3, opt=True) * 1.5, cpu_ds, z3[key(False, True)][0])
    # ZeRO-3 + optimizer and parameter offload: GPU 4*LL; host 18 B/param per node (bf16 weights too) x 1.5.
    z = lay(3, opt=True, par=True)
    cpu_ds, gpu_ds, _ = estimate_zero3_model_states_mem_needs(P, LL, gpn, nodes, cpu_offload=True,
                                                              cpu_offload_params=True)
    close(z.params + z.optim + z.step, gpu_ds, z3[key(True, True)][1])
    close(states_on_host(3, opt=True, par=True) * 1.5, cpu_ds, z3[key(True, True)][0])


# ------------------------------------------------------------------------------------------ layout properties
def test_layouts_behave():
    c = ParamCounts(total=2_000_000_000, trainable=2_000_000_000, buffer_bytes=0, persistent=0,
                    largest_module=50_000_000)
    by = lambda n: {k: layout_memory(c, 1e9, stage=k[0], offload_optimizer=k[1], offload_param=k[2], gpus=n,  # noqa
                                     nodes=max(1, n // 8), overhead=0.0) for k in LAYOUTS}
    one, eight = by(1), by(8)
    for k in LAYOUTS:
        if k[0] > 0:  # partitioned state: more GPUs never cost memory per GPU (stage 0 adds all-reduce buckets)
            assert eight[k].total <= one[k].total
            if not k[1]:  # optimizer on the GPU: its partition shrinks (offloaded, the GPU keeps N-free parts)
                assert eight[k].total < one[k].total
        if k[1] or k[2]:
            assert eight[k].host_per_node > 0
    # at 8 GPUs each stage partitions more; offloading the optimizer moves its 12 B/param off the GPU
    totals = [eight[(s, False, False)].total for s in range(4)]
    assert totals == sorted(totals, reverse=True)
    assert eight[(2, True, False)].total < eight[(2, False, False)].total
    assert eight[(3, True, True)].total < eight[(3, True, False)].total
    with pytest.raises(ValueError, match="stage 2 cannot offload parameters"):
        layout_memory(c, 0.0, stage=2, offload_param=True)
    with pytest.raises(ValueError, match="stage 0 cannot offload the optimizer"):
        layout_memory(c, 0.0, stage=0, offload_optimizer=True)


def test_zero3_steps_a_sub_group_at_a_time_and_flattens_through_the_host():
    """DeepSpeed's ZeRO-3 makes the fp32 gradient and Adam's temporaries of one optimizer sub-group at a time
    (stage3.py `step`: `_prepare_sub_group` ... `_release_sub_group`; the planner charged them for the whole partition)
    and flattens its partitions through a host buffer (zero/utils.py `defragment`: no second copy on the GPU);
    ZeRO-1/2 flatten on the GPU when it has room, else on the host (stage_1_and_2.py)."""
    G = 10 ** 9
    whole = ParamCounts(total=4 * G, trainable=4 * G, buffer_bytes=0, persistent=0, largest_module=G // 10,
                        trainable_sizes=(4 * G,))
    split = ParamCounts(**{**whole.__dict__, "trainable_sizes": (G,) * 4})  # four sub-groups of sub_group_size 1e9
    knobs = ZeroKnobs()
    per_element = 2 + 4 + 4 * knobs.adam_temporaries  # bf16 flattened gradient, its fp32 copy, Adam's temporaries
    step = lambda c: layout_memory(c, 0.0, stage=3, knobs=knobs).step - 2 * knobs.reduce_bucket_size  # noqa: E731
    assert step(whole) == per_element * 4 * G and step(split) == per_element * G
    zero3, zero2 = (layout_memory(split, 0.0, stage=s, knobs=knobs) for s in (3, 2))
    # ZeRO-3's load: the state after initialize (Adam's moments come at the first step; its gradient partition is
    # allocated up front) plus the one module zero.Init builds whole (0.2 GB), not the 8 GB flattening copy
    adam, bucket = 8 * 4 * G, 2 * knobs.reduce_bucket_size
    state = zero3.params - zero3.window + zero3.optim + zero3.ema - adam + zero3.grads - bucket
    assert zero3.load == zero3.load_min == state + 2 * G // 10
    assert zero2.load - zero2.load_min == 2 * 4 * G  # the flattening copy of the trainable weights


def test_a_layout_fits_when_its_load_and_export_fit_too():
    """Qwen-Image full fine-tuning on one 80 GiB GPU: ZeRO-2 with optimizer offload trains in 52 GiB, but its load
    flattens the 20B bf16 weights beside themselves on the GPU (78 GiB, over the 95% margin): not a fit (it was the
    recommendation). On a 60 GiB GPU DeepSpeed flattens on the host instead, and the load shown is that one."""
    path = ROOT / "configs" / "twinflow" / "qwen_image_full.json"
    at = lambda plan: next(lay for lay in plan.layouts if lay.name == "ZeRO-2 offload opt")  # noqa: E731
    lay = at(plan_memory(str(path), gpus=1, gpu_mem_gb=80))
    assert lay.total < 0.95 * 80 * GiB < lay.load and not lay.fits
    small = at(plan_memory(str(path), gpus=1, gpu_mem_gb=60))
    assert small.load == small.load_min < lay.load
    assert small.fits == (max(small.total, small.load, small.export) <= 0.95 * 60 * GiB)


# ------------------------------------------------------------------------------------------------ host memory
def _pow2(nbytes: int) -> int:
    return 1 << (nbytes - 1).bit_length()  # torch's CachingHostAllocator: PowerOf2Ceil of each pinned block


def test_offload_host_is_deepspeeds_host_buffers_with_pinned_rounding(monkeypatch):
    """Qwen-Image full fine-tune + EMA on 8 GPUs (the shipped TwinFlow config): host per node is the sum of the
    host allocations DeepSpeed 0.19.8 and fewstep's EMA make per rank (fewstep.planning.host lists them with source
    lines), each pinned one rounded up to a power of two as torch's pinned allocator does on a GPU run, computed
    here from the architecture's tensor sizes."""
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    plan = plan_memory(ROOT / "configs" / "twinflow" / "qwen_image_full.json", gpus=8, host_mem_gb=1000)
    meta = build_meta_transformer(load_model_config(MODEL_CONFIG_DIR / "qwen_image.json"))
    with torch.device("meta"):
        AnyStep("qwen_image")(meta)  # TwinFlow trains its any-step embedding too
    sizes = [p.numel() for p in meta.parameters()]
    n, Pt = 8, sum(sizes)
    assert plan.counts.trainable == Pt
    lay = {(x.stage, x.offload_optimizer, x.offload_param): x for x in plan.layouts}

    s = -(-Pt // n)  # ZeRO-1/2: one flat partition; pinned: master, bf16 copy-back, fp32 grads, staging, EMA
    zero2 = sum(map(_pow2, [4 * s, 2 * s, 4 * s, 2 * max(sizes), 4 * s])) + 8 * s + 2 * 4 * s  # m, v; AdamW temps
    parts = [-(-t // n) for t in sizes]  # ZeRO-3: per-tensor partitions, sub-groups of >= 1e9 elements
    groups, acc = [], 0
    for i, p in enumerate(parts):
        acc += p
        if acc >= 1e9 or i == len(parts) - 1:
            groups, acc = groups + [acc], 0
    assert len(groups) == 3
    # pinned: the bf16 reduced-gradient buffer and each sub-group's fp32 grads; master, m, v, EMA pageable
    zero3 = _pow2(2 * sum(parts)) + sum(_pow2(4 * g) for g in groups) + 16 * sum(parts) + 2 * 4 * max(groups)
    # parameter offload (EMA: nothing persistent): each tensor's pinned partition (torch's pinned cache keeps it when
    # it moves into the flat pinned buffer of the trainable partitions) and that buffer
    params = sum(_pow2(2 * p) for p in parts) + _pow2(2 * sum(parts))
    for key, per_rank in {(1, True, False): zero2, (2, True, False): zero2, (3, True, False): zero3,
                          (3, False, True): params, (3, True, True): zero3 + params}.items():
        assert lay[key].host_per_node == n * per_rank, key
        assert lay[key].host_per_node > 1.05 * lay[key].host_exact, key  # the note names it
    # before: 16 B/param (+ 4 EMA) at exact sizes, 381 GiB per node for ZeRO-2 offload; allocated, it is 754
    assert lay[(2, True, False)].host_per_node / GiB == pytest.approx(753.6, abs=0.1)
    assert lay[(2, True, False)].host_exact == n * (4 + 2 + 4 + 8 + 8 + 4) * s + n * 2 * max(sizes)
    table = format_table(plan)
    assert "host GiB per node as allocated / exact: ZeRO-1 offload opt 753.6 / 571.9, " in table
    assert "PYTORCH_ALLOC_CONF=pinned_max_round_threshold_mb:64,pinned_max_cached_size_mb:64" in table


def test_pinned_rounding_changes_nothing_at_powers_of_two_or_without_pinning(monkeypatch):
    MB = 2 ** 20
    # every host allocation a power of two: 2^29 + 2^29 elements on 1 GPU, ZeRO-3 sub-groups of 2^29
    c = ParamCounts(2 ** 30, 2 ** 30, 0, 0, 2 ** 29, trainable_sizes=(2 ** 29, 2 ** 29))
    knobs = ZeroKnobs(sub_group_size=2 ** 29)
    for stage, opt, par in LAYOUTS:
        lay = layout_memory(c, 0.0, stage=stage, offload_optimizer=opt, offload_param=par, ema=True, knobs=knobs)
        assert lay.host_per_node == lay.host_exact
        assert (lay.host_per_node > 0) == (opt or par)  # no offload: no host buffers
    # odd sizes: rounded when pinned (a GPU run), exact when not (CPU) or when PYTORCH_ALLOC_CONF lifts the rounding
    odd = ParamCounts(3_000_000_000, 3_000_000_000, 0, 0, 40_000_000, trainable_sizes=(40_000_000,) * 75)
    at = lambda k: layout_memory(odd, 0.0, stage=2, offload_optimizer=True, gpus=8, ema=True, knobs=k)  # noqa: E731
    assert at(ZeroKnobs()).host_per_node > 1.2 * at(ZeroKnobs()).host_exact
    assert at(ZeroKnobs(device="cpu")).host_per_node == at(ZeroKnobs()).host_exact
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True,pinned_max_round_threshold_mb:64, "
                                             "pinned_max_cached_size_mb:64")
    assert pinned_limits() == (64 * MB, 64 * MB)
    lifted = at(ZeroKnobs(pinned_round_max=64 * MB, pinned_cache_max=64 * MB))
    assert lifted.host_per_node == lifted.host_exact == at(ZeroKnobs()).host_exact
    note = [ln for ln in format_table(plan_memory(ROOT / "configs" / "twinflow" / "qwen_image_full.json", gpus=8))
            .splitlines() if "as allocated / exact" in ln]  # only parameter offload's per-tensor blocks (< 64 MiB)
    assert len(note) == 1 and "ZeRO-2" not in note[0] and "ZeRO-3 offload param " in note[0]
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "pinned_max_round_threshold_mb:1024")
    assert pinned_limits() == (1024 * MB, float("inf"))


def test_accumulated_grads_follow_deepspeeds_partitions():
    """ZeRO-1/2 offload with gradient accumulation: a pinned w*numel buffer per tensor overlapping each rank's
    partition (DeepSpeed's own get_partition_info decides which)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    sizes, n = (5_000, 700, 12_000, 3, 9_999, 40_000), 4
    c = ParamCounts(sum(sizes), sum(sizes), 0, 0, max(sizes), trainable_sizes=sizes)
    one, two = (layout_memory(c, 0.0, stage=2, offload_optimizer=True, gpus=n, knobs=ZeroKnobs(accumulation=a))
                for a in (1, 2))
    tensors = [torch.empty(t, device="meta") for t in sizes]
    part = -(-sum(sizes) // n)
    per_rank = [DeepSpeedZeroOptimizer.get_partition_info(None, tensors, part, r)[0] for r in range(n)]
    assert sum(len(p) for p in per_rank) > len(sizes)  # tensors across a boundary: on two ranks
    assert two.host_per_node - one.host_per_node == sum(_pow2(2 * t.numel()) for p in per_rank for t in p)


def test_the_configured_layout_is_the_one_deepspeed_runs(tmp_path):
    """A deepspeed_config file's stage and offload sections win over zero_stage / offload_* in the trainer, so they
    mark the configured (*) row too; and the ZeRO-3 rows keep ZeRO-3's defaults whatever stage the file names (an
    EMA teacher: no persistent parameters)."""
    from fewstep.planning import knobs_for

    zero2 = tmp_path / "zero2.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    mc = dict(TINY)
    plan = plan_memory(cfg(zero_stage=3, deepspeed_config=str(zero2)), model_config=mc)
    assert (plan.configured.stage, plan.configured.offload_optimizer, plan.configured.offload_param) == (2, False, False)
    offload = plan_memory(cfg(zero_stage=2, deepspeed_config="configs/deepspeed/zero3_offload.json"), model_config=mc)
    assert (offload.configured.stage, offload.configured.offload_optimizer, offload.configured.offload_param) == \
        (3, True, True)
    assert plan_memory(cfg(zero_stage=2, offload_optimizer=True), model_config=mc).configured.name == \
        offload.layouts[LAYOUTS.index((2, True, False))].name
    from fewstep.config import load_config
    ema2 = load_config(None, cfg(zero_stage=2, deepspeed_config=str(zero2), use_ema=True))
    assert knobs_for(ema2).param_persistence_threshold == 0


def test_bad_inputs_are_named(tmp_path):
    mc = dict(TINY)
    with pytest.raises(ValueError, match="resolution must be a multiple of 16"):
        plan_memory(cfg(resolution=200), model_config=mc)
    with pytest.raises(ValueError, match="multiple of nodes"):
        plan_memory(cfg(resolution=64), gpus=12, nodes=8, model_config=mc)
    with pytest.raises(ValueError, match=r"LoRA targets \['to_nothing'\] match no module"):
        plan_memory(cfg(resolution=64, model_type="lora", lora_targets=["to_q", "to_nothing"]), model_config=mc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_layers": 2}))
    with pytest.raises(ValueError, match="_class_name"):
        load_model_config(bad)
    with pytest.raises(ValueError, match="model config not found: .*missing.json"):
        load_model_config(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_model_config(tmp_path / "broken.json")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ValueError, match="without transformer/config.json"):
        resolve_model_config("flux", str(empty))


def test_local_diffusers_folder_is_read(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(TINY))
    plan = plan_memory(cfg(pretrained_model_name_or_path=str(tmp_path), resolution=64), text_tokens=8)
    meta = build_meta_transformer(TINY)
    assert plan.counts.total == sum(p.numel() for p in meta.parameters())
    sdxl = tmp_path / "sdxl"  # an SDXL-layout pipeline folder keeps its denoiser in unet/
    (sdxl / "unet").mkdir(parents=True)
    (sdxl / "unet" / "config.json").write_text(json.dumps(SMALL_UNET))
    assert resolve_model_config("sdxl", str(sdxl)) == SMALL_UNET
    plan = plan_memory(cfg(pretrained_model_name_or_path=str(sdxl), resolution=64, model_type="lora",
                           lora_targets=UNET_TARGETS), text_tokens=8)
    assert plan.model == "UNet2DConditionModel"
    assert plan.counts.frozen == sum(p.numel() for p in build_meta_transformer(SMALL_UNET).parameters())


# --------------------------------------------------------------------------- resolution and architecture sources
def _backend(tmp_path, name, *entries):
    """A multidatabackend.json whose image folders do not exist: the planner reads sizes, not images."""
    path = tmp_path / name
    path.write_text(json.dumps([{"backend": "simple", "image_dir": str(tmp_path / "absent"), **e} for e in entries]))
    return str(path)


def test_resolution_is_the_trainers(tmp_path):
    """The planner trains at the data backend's resolution, read by the trainer's own code (load_data_config and
    Geometry): the largest image entry, the config's resolution for entries that set none, SimpleTuner's area map."""
    flux = json.loads((ROOT / "configs" / "glance" / "flux.json").read_text())
    mc = load_model_config(MODEL_CONFIG_DIR / "flux_dev.json")
    plan = lambda **kw: plan_memory({**flux, **kw}, model_config=mc)  # noqa: E731
    at1024 = plan()  # configs/glance/multidatabackend.json: 1024 (its image folder need not exist)
    s = plan(data_backend_config=None, resolution=0.5, resolution_type="area").settings  # no data: the config's, in
    assert (s["resolution"], s["resolution_source"]) == (768, "the config's resolution (no data_backend_config)")  # MP
    mdb512 = _backend(tmp_path, "mdb512.json", {"resolution": 512})
    at512 = plan(data_backend_config=mdb512)
    assert at1024.settings["resolution"] == 1024
    assert at512.settings["resolution"] == 512 and at512.settings["image_tokens"] == 32 ** 2
    assert 0 < at512.configured.acts < at1024.configured.acts / 2
    assert at512.configured.total < at1024.configured.total
    assert at1024.settings["resolution_source"] == "data_backend_config configs/glance/multidatabackend.json entry 0"
    assert at512.settings["resolution_source"] == f"data_backend_config {mdb512} entry 0"
    two = _backend(tmp_path, "two.json", {"id": "small", "resolution": 512}, {"id": "big", "resolution": 768})
    s = plan(data_backend_config=two).settings
    assert s["resolution"] == 768 and "entry 1 ('big') (the largest of 2 image entries)" in s["resolution_source"]
    s = plan(data_backend_config=two, resolution=256).settings  # the entries' own win, as in training (SimpleTuner)
    assert s["resolution"] == 768 and "the config's" not in s["resolution_source"]  # no entry took it
    half = _backend(tmp_path, "half.json", {"id": "small", "resolution": 512}, {"id": "unset"})
    s = plan(data_backend_config=half, resolution=1024).settings  # 'unset' takes it
    assert s["resolution"] == 1024
    assert "the config's resolution 1024 for entries that set none" in s["resolution_source"]
    area = _backend(tmp_path, "area.json", {"resolution": 0.25, "resolution_type": "area", "crop": False})
    s = plan(data_backend_config=area).settings  # 0.25 MP trains at 512 x 512 (SimpleTuner's map), other aspects
    assert s["resolution"] == 528 and "planned at its widest aspect bucket (2, the planner's assumption" in \
        s["resolution_source"] and "720x368 (as a 528x528 square" in s["resolution_source"]  # about that area
    # pixel mode keeps the short side: a 2:1 image has twice a square's tokens (the plan at the square was short)
    wide = _backend(tmp_path, "wide.json", {"resolution": 512, "crop": False})
    s = plan(data_backend_config=wide).settings
    assert s["resolution"] == 736 and "1024x512" in s["resolution_source"]
    capped = _backend(tmp_path, "capped.json", {"resolution": 512, "crop": False, "maximum_aspect_ratio": 1.5,
                                                "minimum_aspect_ratio": 0.75})
    s = plan(data_backend_config=capped).settings
    assert s["resolution"] == 640 and "(1.5, its aspect limit), 768x512" in s["resolution_source"]
    buckets = _backend(tmp_path, "buckets.json", {"resolution": 512, "crop": True, "crop_aspect": "closest",
                                                  "crop_aspect_buckets": [1.0, 1.5]})
    s = plan(data_backend_config=buckets).settings
    assert s["resolution"] == 640 and "its largest crop_aspect_bucket, 768x512" in s["resolution_source"]
    # no data backend: the config's resolution, else the planner's stated default
    assert plan_memory(cfg(resolution=64), model_config=TINY, text_tokens=8).settings["resolution_source"] == \
        "the config's resolution (no data_backend_config)"
    s = plan_memory(cfg(), model_config=TINY, text_tokens=8).settings
    assert s["resolution"] == 1024 and s["resolution_source"].startswith("the planner's default")
    with pytest.raises(ValueError, match="must be an integer >= 8 pixels"):  # the trainer's own check
        plan(data_backend_config=_backend(tmp_path, "bad.json", {"resolution": "big"}))
    with pytest.raises(ValueError, match=r"bad\.json entry 0: resolution 500 must be a multiple of 16"):
        plan(data_backend_config=_backend(tmp_path, "bad.json", {"resolution": 500}))


def test_tiny_model_plans_the_real_architecture_and_says_so():
    """tiny:<family> (a few-MB CPU test model) stands for its family: the plan is the real architecture's, and says so
    in one line (a hub id's plan names the shipped config too)."""
    plan = plan_memory(ROOT / "configs" / "demo" / "glance.json")
    line = ("architecture: tiny:flux is a test model; planning the real FLUX.1 architecture "
            "(configs/models/flux_dev.json) instead (--model_config plans another)")
    assert plan.settings["model_source"] == line and format_table(plan).splitlines()[1] == line
    assert round(plan.counts.frozen / 1e9, 3) == PUBLISHED["flux_dev.json"]
    assert plan.settings["resolution"] == 32  # configs/demo/multidatabackend.json, as the demo trains
    mc = load_model_config(MODEL_CONFIG_DIR / "flux_dev.json")
    assert plan_memory(ROOT / "configs" / "demo" / "glance.json", model_config=mc).settings["model_source"] == \
        "architecture: model_config given as a dict"


PLAN_CLI = load_launcher("plan")


def plan_cli(capsys, *argv) -> tuple[int, str, str]:
    """launcher/plan.py's main in this process (its own process, as a user starts it, is tested once below): (exit
    status, stdout, stderr)."""
    capsys.readouterr()
    status = PLAN_CLI.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_prints_resolution_and_architecture(tmp_path, capsys, monkeypatch):
    """`--data_backend_config mdb512.json` plans at 512 px and says so; a tiny test model says that the real
    architecture is planned instead; a data backend the trainer would reject is one `fewstep:` line, exit 2."""
    mdb512 = _backend(tmp_path, "mdb512.json", {"resolution": 512})
    configs = [str(ROOT / "configs" / "glance" / "flux.json"), str(ROOT / "configs" / "demo" / "glance.json")]
    monkeypatch.chdir(ROOT)
    status, stdout, stderr = plan_cli(capsys, "--config", *configs, "--data_backend_config", mdb512)
    assert status == 0, stderr[-3000:]
    real, demo = re.split(r"\n(?=FluxTransformer2DModel:)", stdout)
    for table in (real, demo):
        assert f"\nresolution: 512px, from data_backend_config {mdb512} entry 0\n" in table
        assert ", 512px = 1024 image + 512 text tokens" in table
    assert "\narchitecture: configs/models/flux_dev.json (model_family flux's shipped FLUX.1, for " \
           "black-forest-labs/FLUX.1-dev)\n" in real
    assert "\narchitecture: tiny:flux is a test model; planning the real FLUX.1 architecture " \
           "(configs/models/flux_dev.json) instead" in demo
    assert demo.startswith("FluxTransformer2DModel: 11.91")  # the real 11.9B transformer (+ LoRA)
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, str(ROOT / "launcher" / "plan.py"), "--config",
                           str(ROOT / "configs" / "demo" / "glance.json"), "--data_backend_config", str(bad)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("fewstep")]
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert len(ours) == 1 and ours[0].startswith(f"fewstep: {bad}: not valid JSON"), proc.stderr


# ----------------------------------------------------------------------------------------------- measured on CPU
WORKER = r'''
"""Peak RSS increases of real DeepSpeed training on CPU, per run (rank 0 reports)."""
import ctypes, gc, json, sys, time


def status():
    with open("/proc/self/status") as fh:
        d = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in fh if l.startswith(("VmRSS", "VmHWM"))}
    return d["VmRSS"], d["VmHWM"]


def start():
    """Collect garbage, hand free heap back, reset VmHWM (Linux: '5' > clear_refs) and return the RSS baseline."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status()[0]


def main(spec):
    import torch, diffusers
    from fewstep.planning.activations import MODEL_INPUTS
    out = {"ds": [], "seconds": []}
    build = lambda mc: getattr(diffusers, mc["_class_name"]).from_config({k: v for k, v in mc.items() if k[0] != "_"})
    from fewstep.config import load_config
    from fewstep.engine.deepspeed_engine import build_engine
    from fewstep.engine.distributed import setup_distributed, teardown
    info = setup_distributed()
    for run in spec["ds"]:  # fewstep's engine: deepspeed.initialize with its generated config, torch AdamW
        base, t0 = start(), time.time()
        cfg = load_config(None, run["config"])
        torch.manual_seed(0)
        model = build(run["model"])
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        engine, _, _ = build_engine(cfg, model, list(model.parameters()))
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        inputs = MODEL_INPUTS[run["model"]["_class_name"]][0](model.config, cfg.train_batch_size,
                                                               int(cfg.resolution) // 16, run["text_tokens"], dtype)
        for i in range(2):  # step 1 creates Adam's state; forward/backward 2 runs with it
            engine.backward(engine(**inputs, return_dict=False)[0].float().pow(2).mean())
            if i == 0:
                engine.step()
        out["ds"].append(status()[1] - base)
        out["seconds"].append(round(time.time() - t0, 1))
        del engine, model, inputs
    if info.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    teardown()  # as launcher/train.py ends: without it gloo's threads can abort the exit (status -6)


main(json.load(open(sys.argv[1])))
'''

ACT_RUNS = [  # (model, LoRA targets, checkpointing): activation-bound models at 512px, batch 1, 64 text tokens
    (NARROW, None, False), (NARROW, None, True), (NARROW, ["to_q", "to_k", "to_v", "to_out.0"], False),
    (NARROW, ["to_q", "to_k", "to_v", "to_out.0"], True),
    ({"_class_name": "SD3Transformer2DModel", "sample_size": 64, "patch_size": 2, "in_channels": 4, "num_layers": 4,
      "attention_head_dim": 32, "num_attention_heads": 4, "caption_projection_dim": 128, "joint_attention_dim": 64,
      "pooled_projection_dim": 32, "out_channels": 4, "pos_embed_max_size": 64}, None, False),
    ({"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 16, "out_channels": 4,
      "num_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 64,
      "axes_dims_rope": [8, 12, 12]}, None, True),
    (SMALL_UNET, None, False), (SMALL_UNET, None, True), (SMALL_UNET, UNET_TARGETS, True)]
DS_RUNS = [(2, "fp32", False), (3, "fp32", True), (2, "bf16", True)]  # (ZeRO stage, precision, checkpointing)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One torchrun launch (2 ranks): a warm-up, then a (tiny, medium) pair of DeepSpeed runs per layout."""
    tmp = tmp_path_factory.mktemp("plan_measured")
    ds_json = tmp / "ds.json"  # small buckets: CPU RSS only counts the touched part of a bucket, a GPU all of it
    ds_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 2e6, "allgather_bucket_size": 2e6}}))
    ds = []
    for stage, prec, ck in [(2, "fp32", False)] + DS_RUNS:
        for model in (TINY, MEDIUM):
            ds.append({"model": model, "text_tokens": 16, "config": cfg(
                mixed_precision=prec, zero_stage=stage, gradient_checkpointing=ck, resolution=128,
                train_batch_size=1, deepspeed_config=str(ds_json))})
    ds = ds[:1] + ds[2:]  # the first run pays one-time costs (imports, first initialize): a tiny warm-up
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"ds": ds}))
    script = tmp / "worker.py"
    script.write_text(WORKER)
    # glibc returns a freed chunk to the OS only if it was mmapped; a fixed threshold makes RSS follow live tensors
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
                str(spec)], timeout=300, MALLOC_MMAP_THRESHOLD_="65536")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):]), ds


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    with open("/proc/self/status") as fh:
        d = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ln.startswith(("VmRSS", "VmHWM"))}
    return d["VmRSS"], d["VmHWM"]


def test_activations_match_measured_rss():
    """Forward + backward of real diffusers transformers on CPU: the peak RSS increase is the activations and their
    transients (parameter gradients already exist: the second of two passes is measured)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: freed tensors go back to the OS, so RSS follows live tensors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops; one thread is fastest on a shared 2-core machine
    try:
        _measure_activations(libc)
    finally:
        torch.set_num_threads(threads)


def _measure_activations(libc):
    import gc

    import diffusers
    from peft import LoraConfig

    from fewstep.planning import model_activations
    from fewstep.planning.activations import MODEL_INPUTS

    for mc, lora, ckpt in ACT_RUNS:
        torch.manual_seed(0)
        model = getattr(diffusers, mc["_class_name"]).from_config({k: v for k, v in mc.items() if k[0] != "_"})
        if ckpt:
            model.enable_gradient_checkpointing()
        if lora:
            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=lora))
        inputs = MODEL_INPUTS[mc["_class_name"]][0](model.config, 1, 512 // 16, 64, torch.float32)
        gc.disable()
        try:
            for _ in range(2):
                gc.collect()
                libc.malloc_trim(0)
                with open("/proc/self/clear_refs", "w") as fh:  # Linux: reset VmHWM to the current RSS
                    fh.write("5")
                base = _rss()[0]
                model(**inputs, return_dict=False)[0].float().pow(2).mean().backward()
            got = _rss()[1] - base
        finally:
            gc.enable()
        est = model_activations(mc, batch=1, resolution=512, text_tokens=64, dtype=torch.float32,
                                lora_targets=lora, lora_rank=8).peak(ckpt)
        label = (mc["_class_name"], lora is not None, ckpt)
        assert got > 5e6, label  # a real measurement, not noise
        assert est == pytest.approx(got, rel=0.15), (label, est / 1e6, got / 1e6)


def test_plan_matches_deepspeed_training_on_cpu(measured):
    """Planner total (CPU knobs, no CUDA overhead) vs the peak RSS increase of 2 ranks training with ZeRO.

    What is measured: rank 0's peak RSS over model build, deepspeed.initialize, forward/backward, an AdamW step and
    a second forward/backward, above the RSS before the model existed. The tiny model (same modules, 34K
    parameters) measures the runtime's fixed cost: Python objects, DeepSpeed's bookkeeping, gloo; that difference
    (medium - tiny) is what the planner's tensor accounting predicts.
    """
    from fewstep.planning import knobs_for
    from fewstep.planning.layouts import as_config

    result, ds = measured
    runs = list(zip(ds, result["ds"]))[1:]  # skip the warm-up
    for (tiny_run, tiny_rss), (med_run, med_rss) in zip(runs[::2], runs[1::2]):
        plans = []
        for spec in (tiny_run, med_run):
            c = as_config(spec["config"])
            plans.append(plan_memory(c, gpus=2, nodes=1, model_config=spec["model"], text_tokens=spec["text_tokens"],
                                     overhead_gb=0.0, knobs=knobs_for(c, "cpu")).configured)
        got, est = med_rss - tiny_rss, plans[1].total - plans[0].total
        label = (plans[1].name, med_run["config"]["mixed_precision"], med_run["config"]["gradient_checkpointing"])
        assert got > 2e8, label
        assert est == pytest.approx(got, rel=0.15), (label, est / 1e6, got / 1e6)


# ----------------------------------------------------------------------------------------------------- the CLI
def test_cli_qwen_image_lora_and_full(tmp_path, capsys):
    base = {"--model_family": "qwen_image", "--pretrained_model_name_or_path": "Qwen/Qwen-Image", "--lora_rank": 64,
            "--resolution": 1024, "--train_batch_size": 1, "--gradient_checkpointing": True}
    paths = []
    for mode in ("lora", "full"):
        paths.append(tmp_path / f"qwen_{mode}.json")
        paths[-1].write_text(json.dumps({**base, "--model_type": mode}))
    status, stdout, stderr = plan_cli(capsys, "--config", *paths, "--gpus", "1,8,32")
    assert status == 0, stderr[-3000:]
    tables = re.split(r"\n(?=QwenImageTransformer2DModel:)", stdout)
    assert len(tables) == 6, stdout
    names = [layout_memory(ParamCounts(1, 1, 0, 0, 1), 0.0, stage=s, offload_optimizer=o, offload_param=p).name
             for s, o, p in LAYOUTS]
    for i, table in enumerate(tables):
        mode, gpus = ("lora", "full")[i // 3], (1, 8, 32)[i % 3]
        assert f"{gpus} GPU(s)" in table
        assert ("LoRA r64" in table and "20.430B frozen" in table) if mode == "lora" else "full fine-tuning" in table
        rows = [ln for ln in table.splitlines() if re.match(r"^[ *][ >]ZeRO-", ln)]
        assert [r[2:26].strip() for r in rows] == names
        rec = [r for r in rows if r[1] == ">"]
        assert len(rec) == 1 and rec[0].rstrip().endswith("yes")
        assert all(r.rstrip().endswith("no") or "host" in r for r in rows[:rows.index(rec[0])])  # least comm first
        assert f"recommended: {rec[0][2:26].strip()}," in table
    # 16 bytes per parameter of model states (305 GiB) cannot sit on one 80 GiB GPU without offload
    assert re.search(r"^  ZeRO-0 .* no$", tables[3], re.M)
    status, stdout, stderr = plan_cli(capsys, "--config", paths[0], "--lora_rnk", "4")
    assert status == 2 and stdout == "" and "lora_rnk" in stderr and "lora_rank" in stderr


def test_cli_sdxl_twinflow_lora(capsys):
    """configs/twinflow/sdxl_lora.json (TwinFlow through diff2flow, LoRA r64 on the attention projections, 1024px)."""
    status, stdout, stderr = plan_cli(capsys, "--config", ROOT / "configs" / "twinflow" / "sdxl_lora.json", "--gpus",
                                      "1,8")
    assert status == 0, stderr[-3000:]
    tables = re.split(r"\n(?=UNet2DConditionModel:)", stdout)
    assert len(tables) == 2 and all(t.startswith("UNet2DConditionModel: 2.662B params") for t in tables), stdout
    for gpus, table in zip((1, 8), tables):
        assert f"{gpus} GPU(s)" in table and "LoRA r64" in table and "2.567B frozen" in table
        assert "twinflow, bf16, 1024px = 4096 image + 77 text tokens" in table
        rows = [ln for ln in table.splitlines() if re.match(r"^[ *][ >]ZeRO-", ln)]
        assert len(rows) == len(LAYOUTS) and all(r.rstrip().endswith("yes") for r in rows)  # 2.6B LoRA: all fit
        assert [r for r in rows if r[0] == "*"][0][2:26].strip() == "ZeRO-2"  # the config's zero_stage
        assert "recommended: ZeRO-0," in table
