"""Real 2-rank DeepSpeed runs on CPU/gloo: ZeRO-2 and ZeRO-3, LoRA and full fine-tuning, via torchrun and the
deepspeed launcher."""
import json
import os

import torch
from safetensors.torch import load_file

from fewstep_testing import free_port, read_metrics, run, write_config, write_dataset


def straight_and_resumed(name, overrides):
    """Runs `name` (4 steps) and `name`-resumed (2 steps, then resumed from its last checkpoint to 4), the resumed
    halves with uninitialised memory filled with NaN (see distributed_worker.py): the bit-for-bit comparison of the
    two also shows that nothing reads memory it never wrote (garbage on a GPU, zeros on the CPU)."""
    o = {**overrides, "checkpointing_steps": 2}
    return [[name, {**o, "max_train_steps": 4}], [f"{name}-resumed", {**o, "max_train_steps": 2, "_nan_fill": True}],
            [f"{name}-resumed", {**o, "max_train_steps": 4, "resume_from_checkpoint": "latest", "_nan_fill": True}]]


def test_zero2_zero3_lora_and_full_on_two_ranks(tmp_path):
    backend = write_dataset(str(tmp_path), n=4)
    cfg = write_config(str(tmp_path), backend, max_train_steps=3, train_batch_size=1, checkpointing_steps=3,
                       cache_dir=str(tmp_path / "cache"))
    runs = [["z2-lora", {"zero_stage": 2}], ["z3-lora", {"zero_stage": 3}],
            ["z2-full", {"zero_stage": 2, "model_type": "full", "learning_rate": 1e-4, "use_ema": True}],
            ["z3-full-bf16", {"zero_stage": 3, "model_type": "full", "learning_rate": 1e-4, "mixed_precision": "bf16",
                              "use_ema": True, "gradient_accumulation_steps": 2}],
            ["z2-twinflow-lora", {"zero_stage": 2, "twinflow_enabled": True, "use_ema": True, "ema_decay": 0.99,
                                  "twinflow_adversarial_enabled": True, "max_train_steps": 2, "checkpointing_steps": 2}],
            ["z3-twinflow-full", {"zero_stage": 3, "model_type": "full", "twinflow_enabled": True, "use_ema": True,
                                  "ema_decay": 0.99, "twinflow_adversarial_enabled": True, "learning_rate": 1e-4,
                                  "mixed_precision": "bf16", "max_train_steps": 2, "checkpointing_steps": 2}],
            ["z2-glance-rr", {"zero_stage": 2, "method": "glance", "glance_slow_timesteps": "0.9,0.8,0.7",
                              "glance_fast_timesteps": "0.5,0.3,0.1", "flow_timesteps_mode": "round-robin",
                              "max_train_steps": 2, "checkpointing_steps": 2}],
            # DeepSpeed's own optimizers (JIT-built on first use) and ZeRO-Offload, each also resumed half way
            *straight_and_resumed("z2-fusedadam", {"zero_stage": 2, "optimizer": "deepspeed"}),
            *straight_and_resumed("z3-cpuadam-ema", {"zero_stage": 3, "model_type": "full", "learning_rate": 1e-4,
                                                     "mixed_precision": "bf16", "use_ema": True,
                                                     "optimizer": "deepspeed", "offload_optimizer": True}),
            ["z2-glance-cpuadam", {"zero_stage": 2, "method": "glance", "glance_slow_timesteps": "0.9,0.8,0.7",
                                   "glance_fast_timesteps": "0.5,0.3,0.1", "optimizer": "deepspeed",
                                   "offload_optimizer": True, "max_train_steps": 2, "checkpointing_steps": 2}],
            ["z3-adamw-offload", {"zero_stage": 3, "offload_optimizer": True}],
            # TwinFlow's EMA teacher swap and kernels over ZeRO-3 partitions (padded) with uninitialised memory = NaN
            *[[f"z3-twinflow-lora{tag}", {"zero_stage": 3, "twinflow_enabled": True, "use_ema": True,
                                         "ema_decay": 0.9, "twinflow_adversarial_enabled": True,
                                         "max_train_steps": 2, "mixed_precision": "bf16", "_nan_fill": fill}]
              for tag, fill in (("", False), ("-nanfill", True))]]
    run(["torchrun", "--nproc_per_node", "2", "--standalone", "tests/engine/distributed_worker.py", cfg,
         json.dumps(runs)], timeout=900)
    out = tmp_path / "out"
    z2, z3 = read_metrics(out / "z2-lora"), read_metrics(out / "z3-lora")
    assert len(z2) == len(z3) == 3
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(z2, z3)) < 1e-5  # same maths, different sharding
    a, b = load_file(out / "z2-lora" / "pytorch_lora_weights.safetensors"), \
        load_file(out / "z3-lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)
    # ZeRO-3 really shards: one model-state file per rank
    state = out / "z3-full-bf16" / "checkpoints" / "step-3" / "state"
    assert len([f for f in os.listdir(state) if f.endswith("model_states.pt")]) == 2
    for name in ("z2-full", "z3-full-bf16"):
        assert (out / name / "transformer" / "diffusion_pytorch_model.safetensors").exists()
        ranks = [f for f in os.listdir(out / name / "checkpoints" / "step-3") if f.startswith("rank")]
        assert sorted(ranks) == ["rank0.pt", "rank1.pt"]  # each rank saved its EMA partition and RNG


    for name in ("z2-twinflow-lora", "z3-twinflow-full"):
        m = read_metrics(out / name)
        assert len(m) == 2 and all(k in m[0] for k in ("l_base", "l_adv", "l_rectify"))
    assert (out / "z2-twinflow-lora" / "anystep_embeddings.safetensors").exists()
    # gathered before saving: a ZeRO-3 rank's own partition would be an empty tensor
    embed = load_file(out / "z3-twinflow-full" / "transformer" / "anystep_embeddings.safetensors")
    assert embed["sign_embed.weight"].shape[0] == 2 and all(v.numel() > 0 for v in embed.values())
    # round-robin over the global batch (2 ranks x batch 1): each step consumes two list entries in order, so the
    # cursor saved with the final checkpoint (step 4 = 2 Slow + 2 Fast steps) is (2 steps * 2) mod 3 = 1 on every rank
    for r in (0, 1):
        state = torch.load(out / "z2-glance-rr" / "checkpoints" / "step-4" / f"rank{r}.pt", weights_only=False)
        assert [s["cursor"] for s in state["samplers"]] == [1, 1]
    sig = [m["sigma_mean"] for m in read_metrics(out / "z2-glance-rr")]
    # the logged sigma is the mean over the global batch: positions (0, 1), (2, 0) of the Slow list, then of Fast
    assert len(sig) == 4 and max(abs(a - b) for a, b in zip(sig, [0.85, 0.8, 0.4, 0.3])) < 1e-6

    # FusedAdam (ZeRO-2) and DeepSpeedCPUAdam (ZeRO-3 offload, with the EMA): 2 steps + resume = 4 steps, the same
    # losses and weights bit for bit. (DeepSpeed's CPU Adam op, DeepSpeedCPUAdam's and FusedAdam's on the CPU, would
    # take beta**3 from std::pow at the first step after a resume, not the straight run's running product:
    # `replay_adam_bias_correction` gives it the product.)
    for name, weights in (("z2-fusedadam", ["pytorch_lora_weights.safetensors"]),
                          ("z3-cpuadam-ema", ["transformer/diffusion_pytorch_model.safetensors",
                                              "ema/transformer/diffusion_pytorch_model.safetensors"])):
        a, b = read_metrics(out / name), read_metrics(out / f"{name}-resumed")
        assert [m["step"] for m in b] == [1, 2, 3, 4]
        assert [m["loss"] for m in a] == [m["loss"] for m in b] and a[0]["loss"] != a[-1]["loss"]
        for f in weights:
            wa, wb = load_file(out / name / f), load_file(out / f"{name}-resumed" / f)
            assert wa.keys() == wb.keys(), (name, f)
            assert all(torch.equal(wa[k], wb[k]) for k in wa), (name, f)
    ema, live = (load_file(out / "z3-cpuadam-ema" / f"{d}transformer/diffusion_pytorch_model.safetensors")
                 for d in ("ema/", ""))
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # the EMA export is the EMA, not the live weights
    for phase in ("glance-slow", "glance-fast"):
        assert (out / "z2-glance-cpuadam" / phase / "pytorch_lora_weights.safetensors").exists()
    assert len(read_metrics(out / "z3-adamw-offload")) == 3
    a, b = read_metrics(out / "z3-twinflow-lora"), read_metrics(out / "z3-twinflow-lora-nanfill")
    assert [m["loss"] for m in a] == [m["loss"] for m in b] and all(m["skipped_steps"] == 0 for m in b)
    for f in ("pytorch_lora_weights.safetensors", "anystep_embeddings.safetensors",
              "ema/pytorch_lora_weights.safetensors"):
        wa, wb = load_file(out / "z3-twinflow-lora" / f), load_file(out / "z3-twinflow-lora-nanfill" / f)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f


def test_deepspeed_launcher_zero3_twinflow_seed_config(tmp_path):
    """`deepspeed --num_gpus 2 launcher/train.py --config <seed-style TwinFlow config> --zero_stage 3` on CPU."""
    backend = write_dataset(str(tmp_path), n=2)
    seed_style = {"model_family": "flux", "model_type": "lora", "pretrained_model_name_or_path": "tiny:flux",
                  "output_dir": str(tmp_path / "out"), "data_backend_config": backend, "distillation_method": None,
                  "use_ema": True, "twinflow_enabled": True, "twinflow_target_step_count": 2,
                  "twinflow_estimate_order": 2, "twinflow_enhanced_ratio": 0.5, "twinflow_delta_t": 0.01,
                  "twinflow_target_clamp": 1.0, "learning_rate": 1e-4, "train_batch_size": 1,
                  "gradient_accumulation_steps": 4, "mixed_precision": "bf16", "validation_guidance": 0.0,
                  "validation_num_inference_steps": 2, "max_train_steps": 2}
    cfg = tmp_path / "twinflow.json"
    cfg.write_text(json.dumps(seed_style))
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launcher/train.py", "--config",
         str(cfg), "--zero_stage", "3"], timeout=600)
    out = tmp_path / "out"
    assert len(read_metrics(out)) == 2
    from fewstep.models import get_adapter
    adapter = get_adapter("flux")
    pipe = adapter.build_pipeline(adapter.load("tiny:flux"))
    pipe.load_lora_weights(str(out))  # stock diffusers loads what ZeRO-3 trained
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert (out / "anystep_embeddings.safetensors").exists()


def test_ema_weights_swap_into_every_zero_stage():
    """swap_worker: the EMA swap (with accelerator syncs around its writes), Glance's optimizer reset, the LR
    schedule and training steps without an accelerator sync, for every ZeRO stage and for torch AdamW, FusedAdam and
    DeepSpeedCPUAdam."""
    proc = run(["torchrun", "--nproc_per_node", "2", "--standalone", "tests/engine/swap_worker.py"],
               timeout=600)
    assert proc.stdout.count("ALL SWAPS OK") == 2
    assert proc.stdout.count("swap ok:") == 11
    assert "FusedAdam" in proc.stdout and "DeepSpeedCPUAdam" in proc.stdout


def test_deepspeeds_deprecated_collective_names_do_not_flood_the_log(tmp_path):
    """torch 2.13 warns on every call of the collective names DeepSpeed's ZeRO-3 uses (dozens a step); after
    `quiet_deprecated_collectives` (called by setup_distributed) they are silent, other FutureWarnings are not."""
    import subprocess
    import sys

    code = f"""
import warnings, torch, torch.distributed as dist
from fewstep.engine.distributed import quiet_deprecated_collectives
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
x = torch.ones(3)

def calls():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet and quiet_deprecated_collectives()
        dist.all_gather_into_tensor(torch.empty(3), x)
        dist.reduce_scatter_tensor(torch.empty(3), x)
        warnings.warn("another", FutureWarning)
    return sorted(str(w.message)[:40] for w in seen if w.category is FutureWarning)

quiet = False
loud = calls()
quiet = True
print(len(loud), calls())
dist.destroy_process_group()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "default"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "['another']"], out.stdout  # the two deprecations are torch's today
