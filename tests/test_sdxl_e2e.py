"""SDXL (an epsilon or v-prediction UNet) trained with TwinFlow through diff2flow, end to end on tiny models: the seed's
config with the diff2flow addition, 2-rank ZeRO-2/3 LoRA and full runs with exact resume, `launcher/sample.py` and a
stock `StableDiffusionXLPipeline` at 1 and 2 steps."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from diffusers import UNet2DConditionModel

from fewstep.models import get_adapter
from fewstep_testing import PY, REPO, assert_resumed_run_matches, cpu_env, read_metrics, run, write_dataset

# SimpleTuner's TwinFlow seed config (the LoRA part), plus the guide's addition for diffusion models
SEED = {"model_type": "lora", "distillation_method": None, "use_ema": True, "twinflow_enabled": True,
        "twinflow_target_step_count": 2, "twinflow_estimate_order": 2, "twinflow_enhanced_ratio": 0.5,
        "twinflow_delta_t": 0.01, "twinflow_target_clamp": 1.0, "learning_rate": 1e-4, "train_batch_size": 1,
        "gradient_accumulation_steps": 4, "mixed_precision": "bf16", "validation_guidance": 0.0,
        "validation_num_inference_steps": 2}
DIFF2FLOW = {"prediction_type": "epsilon", "diff2flow_enabled": True, "twinflow_allow_diff2flow": True}
SMALL = {"mixed_precision": "fp32", "gradient_accumulation_steps": 1, "train_batch_size": 1, "learning_rate": 5e-3,
         "validation_steps": 0, "checkpointing_steps": 0, "twinflow_adversarial_enabled": True, "ema_decay": 0.99}
FULL = {"model_type": "full", "learning_rate": 1e-4}


def straight_and_resumed(name, overrides):
    o = {**overrides, "checkpointing_steps": 2}
    return [[name, {**o, "max_train_steps": 4}], [f"{name}-resumed", {**o, "max_train_steps": 2}],
            [f"{name}-resumed", {**o, "max_train_steps": 4, "resume_from_checkpoint": "latest"}]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fewstep.models.tiny import ensure_tiny_pipeline

    root = tmp_path_factory.mktemp("sdxl")
    backend = write_dataset(str(root), n=2)
    eps = str(ensure_tiny_pipeline("sdxl"))
    v = str(root / "sdxl-v")  # the same weights, scheduler config switched to v prediction
    shutil.copytree(eps, v)
    sched = os.path.join(v, "scheduler", "scheduler_config.json")
    with open(sched) as fh:
        cfg = json.load(fh)
    with open(sched, "w") as fh:
        json.dump({**cfg, "prediction_type": "v_prediction"}, fh)
    base = {**SEED, **DIFF2FLOW, **SMALL, "model_family": "sdxl", "pretrained_model_name_or_path": eps,
            "data_backend_config": backend, "output_dir": str(root / "out"), "cache_dir": str(root / "cache")}
    config = root / "config.json"
    config.write_text(json.dumps(base))
    as_v = {"pretrained_model_name_or_path": v, "prediction_type": "v_prediction"}
    matrix = [*straight_and_resumed("eps-z2-lora", {"zero_stage": 2}),
              *straight_and_resumed("v-z3-full", {"zero_stage": 3, **FULL, **as_v}),
              ["eps-z3-lora", {"zero_stage": 3, "max_train_steps": 4}],
              # and non-equal batch-group shares: the e2e, e2e, mul, any, adv cycle over 5 accumulation micro-steps
              ["v-z2-full", {"zero_stage": 2, **FULL, **as_v, "max_train_steps": 2, "gradient_accumulation_steps": 5,
                             "twinflow_group_weights": [2, 1, 1, 1]}]]
    run(["torchrun", "--nproc_per_node", "2", "--standalone", "tests/engine/distributed_worker.py",
         str(config), json.dumps(matrix)], timeout=900)
    return root


def test_seed_config_with_the_diff2flow_addition_trains_as_written(tmp_path):
    """The seed's own settings (bf16, batch 1 x 4 accumulation, CFG-enhanced target) plus the addition, one process;
    a prediction type that disagrees with the folder's scheduler config is named in a warning, and the config wins."""
    backend = write_dataset(str(tmp_path), n=2)
    config = tmp_path / "seed.json"
    config.write_text(json.dumps({**{f"--{k}": v for k, v in SEED.items()}, "--model_family": "sdxl",
                                  "--pretrained_model_name_or_path": "tiny:sdxl", "--data_backend_config": backend,
                                  "--output_dir": str(tmp_path / "out"), "--max_train_steps": 2,
                                  "--validation_steps": 2,
                                  "--prediction_type": "v_prediction", "--diff2flow_enabled": True,
                                  "--twinflow_allow_diff2flow": True}))
    proc = run([PY, "launcher/train.py", "--config", str(config)])
    assert "prediction_type 'v_prediction' (config) differs from 'epsilon'" in proc.stdout
    m = read_metrics(tmp_path / "out")
    assert [r["step"] for r in m] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in m)
    assert (tmp_path / "out" / "validation" / "twinflow-step000002.png").exists()  # validation images sample it
    info = json.loads((tmp_path / "out" / "fewstep_run.json").read_text())
    assert info["config"]["prediction_type"] == "v_prediction"
    # sampling the run names the disagreement as training did (the run's type is used)
    sample = subprocess.run([PY, "launcher/sample.py", "--method", "twinflow", "--lora", str(tmp_path / "out"),
                             "--prompt", "a red circle", "--steps", "1", "--device", "cpu",
                             "--output", str(tmp_path / "s.png")], cwd=REPO, env=cpu_env(), capture_output=True,
                            text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "fewstep: warning: prediction_type 'v_prediction' (config) differs from 'epsilon'" in sample.stderr


def test_two_ranks_lora_and_full_resume_exactly(runs):
    out = runs / "out"

    def lora(d):
        return load_file(os.path.join(d, "pytorch_lora_weights.safetensors"))

    w = assert_resumed_run_matches(out / "eps-z2-lora", out / "eps-z2-lora-resumed", 4, lora)
    assert all(k.startswith("unet.") for k in w)  # StableDiffusionXLPipeline's LoRA layout
    # ZeRO-3 shards the same maths: same losses and LoRA as ZeRO-2
    z2, z3 = read_metrics(out / "eps-z2-lora"), read_metrics(out / "eps-z3-lora")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(z2, z3)) < 1e-5
    # fp32 reduction order differs, and a TwinFlow target element at the clamp (twinflow_target_clamp) can then fall
    # on either side (an AMD EPYC box: clamp_fraction differs by one element at step 1); Adam turns that element's
    # gradient difference into a full-size update of the weights it reaches (3.7e-4 relative there; below 1e-5 on the
    # Intel boxes before). A gradient lost or doubled on a ZeRO-3 partition differs by the order of the whole update.
    w3 = lora(out / "eps-z3-lora")
    assert sum((w[k] - w3[k]).norm() ** 2 for k in w) ** 0.5 <= 2e-3 * sum(w[k].norm() ** 2 for k in w) ** 0.5

    a, b = read_metrics(out / "v-z3-full"), read_metrics(out / "v-z3-full-resumed")
    assert [m["step"] for m in b] == [1, 2, 3, 4] and [m["loss"] for m in a] == [m["loss"] for m in b]
    for sub in ("unet", "ema/unet"):  # full and EMA exports equal bit for bit: UNet and any-step embeddings
        for f in ("diffusion_pytorch_model.safetensors", "anystep_embeddings.safetensors"):
            wa, wb = load_file(out / "v-z3-full" / sub / f), load_file(out / "v-z3-full-resumed" / sub / f)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (sub, f)
    base = get_adapter("sdxl").load(str(runs / "sdxl-v"), with_text=False, with_vae=False).denoiser
    for name in ("v-z3-full", "v-z2-full"):
        tuned = UNet2DConditionModel.from_pretrained(out / name / "unet")  # a stock UNet folder
        assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), base.parameters()))
        embed = load_file(out / name / "unet" / "anystep_embeddings.safetensors")  # gathered, not a ZeRO-3 shard
        assert embed["sign_embed.weight"].shape == (2, base.time_embedding.linear_2.out_features)
        assert (out / name / "ema" / "unet" / "anystep_embeddings.safetensors").exists()
        m = read_metrics(out / name)
        assert all(k in m[0] for k in ("l_base", "l_adv", "l_rectify"))
    for m in read_metrics(out / "v-z2-full"):  # twinflow_group_weights 2:1:1:1 reached the training step
        assert (m["n_e2e"], m["n_mul"], m["n_any"], m["n_adv"]) == (0.4, 0.2, 0.2, 0.2)


@pytest.mark.parametrize("name", ["eps-z2-lora", "v-z3-full"])
def test_sample_cli_one_and_two_steps(runs, tmp_path, name):
    from PIL import Image

    out = tmp_path / "img.png"
    run([PY, "launcher/sample.py", "--method", "twinflow", "--lora", str(runs / "out" / name), "--prompt",
         "a red circle", "--steps", "1", "2", "--output", str(out)])
    imgs = [Image.open(tmp_path / f"img-{n}.png") for n in (1, 2)]
    assert all(im.size == (32, 32) for im in imgs)
    assert imgs[0].tobytes() != imgs[1].tobytes()


@pytest.mark.parametrize("steps", [1, 2])
def test_stock_pipeline_samples_what_training_validates(runs, steps):
    """A stock StableDiffusionXLPipeline with the LoRA, the any-step embeddings and fewstep's scheduler set for an
    epsilon model gives, from the same noise, the sample of the trainer's validation loop over `adapter.forward`."""
    from diffusers import StableDiffusionXLPipeline

    from fewstep.models import anystep, get_adapter
    from fewstep.sampling import twinflow_loop
    from fewstep.schedulers import TwinFlowScheduler
    from fewstep.schedulers.twinflow import twinflow_preset

    run_dir = str(runs / "out" / "eps-z2-lora")
    pipe = StableDiffusionXLPipeline.from_pretrained(json.loads(open(os.path.join(run_dir, "fewstep_run.json")).read())
                                                     ["config"]["pretrained_model_name_or_path"])
    pipe.load_lora_weights(run_dir)
    adapter = get_adapter("sdxl")
    adapter.add_anystep(pipe.unet)
    anystep.load_anystep(pipe.unet, run_dir)
    pipe.scheduler = TwinFlowScheduler.from_config(pipe.scheduler.config, **twinflow_preset(steps))
    assert pipe.scheduler.config.prediction_type == "epsilon"  # carried over from the folder
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), anystep.anystep_state(pipe.unet, sign=1.0, scheduler=pipe.scheduler):
        got = pipe(prompt="a red circle", num_inference_steps=steps, guidance_scale=1.0, latents=x0.clone(),
                   height=32, width=32, output_type="latent").images
        image = pipe("a red circle", num_inference_steps=steps, height=32, width=32).images[0]  # as users call it
    assert image.size == (32, 32)
    cond = adapter.encode_prompts(adapter.load(pipe.name_or_path, with_denoiser=False), ["a red circle"])
    sched = TwinFlowScheduler(num_train_timesteps=1000, prediction_type="flow_matching", **twinflow_preset(steps))
    with torch.no_grad():
        want = twinflow_loop(lambda x, s, tt: adapter.forward(pipe.unet, x, s, cond, tt=tt, sign=torch.ones(1)),
                             x0.clone(), sched, steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sample_cli_refuses_flow_and_guides_away_from_the_zeros_it_trained_with(runs, tmp_path, monkeypatch):
    """An SDXL run samples with TwinFlow only (the stock pipeline's scheduler is a diffusion one: --method flow
    stopped with an AttributeError); with CFG, its default negative is "" (zeros, training's unconditional input and
    the stock pipeline's), not CLIP's embedding of " "."""
    import importlib.util

    run_dir = str(runs / "out" / "eps-z2-lora")
    proc = subprocess.run([PY, "launcher/sample.py", "--method", "flow", "--lora", run_dir, "--prompt", "a red circle",
                           "--output", str(tmp_path / "f.png")], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "fewstep: --method flow: a sdxl run samples with --method twinflow (a diffusion base trains TwinFlow only, "
        "through diff2flow)"), proc.stderr[-2000:]
    spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(REPO, "launcher", "sample.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    encoded, adapter_cls = [], type(get_adapter("sdxl"))
    real = adapter_cls.encode_prompts
    monkeypatch.setattr(adapter_cls, "encode_prompts", lambda self, comps, prompts, **k: encoded.append(list(prompts))
                        or real(self, comps, prompts, **k))
    cli.sample(cli.build_parser().parse_args(["--method", "twinflow", "--lora", run_dir, "--prompt", "a red circle",
                                              "--steps", "1", "--cfg-scale", "2", "--device", "cpu",
                                              "--output", str(tmp_path / "g.png")]))
    assert encoded == [[""], ["a red circle"]], encoded
