"""TwinFlow end to end on tiny models: training through the launcher, any-step embeddings, sampling."""
import os

import pytest
import torch

from fewstep_testing import PY, read_metrics, run, write_config, write_dataset


@pytest.fixture(scope="module")
def tw_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("twinflow")
    backend = write_dataset(str(root), n=2)
    cfg = write_config(str(root), backend, twinflow_enabled=True, use_ema=True, ema_decay=0.99,
                       twinflow_adversarial_enabled=True, train_batch_size=1, gradient_accumulation_steps=4,
                       max_train_steps=3, learning_rate=5e-3, twinflow_target_step_count=2, validation_steps=3)
    run([PY, "launcher/train.py", "--config", cfg])
    return os.path.join(str(root), "out")


def test_batch_one_cycles_all_groups_and_logs_each_loss(tw_run):
    metrics = read_metrics(tw_run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:  # batch 1 x 4 micro-steps: e2e, mul, any, adv once each per optimizer step
        assert m["n_e2e"] == m["n_mul"] == m["n_any"] == m["n_adv"] == 0.25
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss", "l_base", "l_adv", "l_rectify"))
    assert any(m["l_rectify"] > 0 for m in metrics) and any(m["l_adv"] > 0 for m in metrics)
    assert os.path.exists(os.path.join(tw_run, "validation", "twinflow-step000003.png"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(tw_run, "logs"))
    acc.Reload()
    assert any(tag.startswith("twinflow/trajectories") for tag in acc.Tags()["images"])
    assert [e.step for e in acc.Scalars("train/l_rectify")] == [1, 2, 3]


def test_sign_embedding_trains_under_lora_and_separates_twin_time(tw_run):
    from fewstep.models import anystep, get_adapter

    adapter = get_adapter("flux")
    comps = adapter.load("tiny:flux", with_text=False, with_vae=False)
    t = comps.denoiser
    t.load_lora_adapter(os.path.join(tw_run, "pytorch_lora_weights.safetensors"), prefix="transformer")
    adapter.add_anystep(t)
    anystep.load_anystep(t, tw_run)
    sd = anystep.anystep_state_dict(t)
    sign_w = [v for k, v in sd.items() if "sign" in k][0]
    assert sign_w.abs().sum() > 0  # trained away from its zero init (frozen, as in SimpleTuner, it would stay 0)
    assert sign_w[1].abs().sum() > 0  # the fake trajectory's row (sign -1) too: L_adv trains it
    g = torch.Generator().manual_seed(0)
    shape = adapter.encode_images(adapter.load("tiny:flux", with_text=False).vae, torch.zeros(1, 3, 32, 32)).shape
    x = torch.randn(shape, generator=g)
    cond = {"prompt_embeds": torch.randn(1, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
    s = torch.tensor([0.6])
    with torch.no_grad():
        pos = adapter.forward(t, x, s, cond, tt=torch.tensor([0.6]), sign=torch.tensor([1.0]))
        neg = adapter.forward(t, x, s, cond, tt=torch.tensor([0.6]), sign=torch.tensor([-1.0]))
    assert (pos - neg).abs().max() > 1e-6  # F(x, t) != F(x, -t)


def test_sample_cli_1_2_4_steps(tw_run, tmp_path):
    from PIL import Image
    out = tmp_path / "tw.png"
    run([PY, "launcher/sample.py", "--method", "twinflow", "--lora", tw_run, "--steps", "1", "2", "4",
         "--prompt", "a red circle", "--output", str(out)])
    for n in (1, 2, 4):
        assert Image.open(tmp_path / f"tw-{n}.png").size == (32, 32)


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image"])
def test_seed_scheduler_snippet_in_each_pipeline(family):
    """pipe.scheduler = TwinFlowScheduler(...); pipe(prompt, guidance_scale=0.0, num_inference_steps=2) with the
    any-step inputs supplied (tt = 0, sign = +1) equals a hand-written UCGM loop over adapter.forward."""
    from fewstep.models import anystep, get_adapter
    from fewstep.sampling import twinflow_loop
    from fewstep.schedulers import TwinFlowScheduler

    torch.manual_seed(0)
    adapter = get_adapter(family)
    comps = adapter.load(f"tiny:{adapter.family}")
    adapter.add_anystep(comps.denoiser)
    with torch.no_grad():  # non-zero embeddings, so that a missing tt/sign would show
        for p in comps.denoiser.anystep_embed.parameters():
            p.normal_(0, 0.05)
    pipe = adapter.build_pipeline(comps)
    pipe.scheduler = TwinFlowScheduler(num_train_timesteps=1000, prediction_type="flow_matching", shift=1.0,
                                       stochastic_ratio=0.0)
    pipe.scheduler.set_timesteps(num_inference_steps=2)
    cond = adapter.encode_prompts(comps, ["a red circle"])
    shape = adapter.encode_images(comps.vae, torch.zeros(1, 3, 32, 32)).shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with anystep.anystep_state(comps.denoiser, tt=0.0, sign=1.0):
        kwargs = adapter.pipeline_prompt_kwargs(cond)
        kwargs.setdefault("guidance_scale", 0.0)  # the seed's guidance 0.0 (Flux keeps its distilled guidance)
        out = pipe(**kwargs, num_inference_steps=2,
                   output_type="latent", **adapter.pipeline_latent_kwargs(comps, noise)).images
    got = adapter.latents_from_pipeline(out, *shape[-2:])
    sched = TwinFlowScheduler(num_train_timesteps=1000, prediction_type="flow_matching", stochastic_ratio=0.0)
    ref = twinflow_loop(lambda x, s, tt: adapter.forward(comps.denoiser, x, s, cond, tt=tt, sign=torch.ones(1)),
                        noise, sched, 2)
    assert (got.float() - ref.float()).abs().max() < 1e-4
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([0.999, 0.6, 0.0], abs=1e-6)


def test_frozen_teacher_run_trains_and_exports_no_ema_copy(tmp_path):
    """ema_decay 1: the teacher is the frozen start (the base under LoRA). Training runs with the CFG target built
    on the frozen teacher; there is no EMA to export (it would be a copy of the starting weights)."""
    backend = write_dataset(str(tmp_path), n=4)
    cfg = write_config(str(tmp_path), backend, twinflow_enabled=True, use_ema=True, ema_decay=1.0,
                       twinflow_enhanced_ratio=1.0, train_batch_size=4, max_train_steps=2, learning_rate=5e-3)
    run([PY, "launcher/train.py", "--config", cfg])
    out = os.path.join(str(tmp_path), "out")
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["n_enhanced"] > 0 for m in metrics)
    assert os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert not os.path.exists(os.path.join(out, "ema"))
