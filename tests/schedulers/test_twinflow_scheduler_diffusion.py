"""TwinFlowScheduler on epsilon / v-prediction diffusion bases (diff2flow bridge), in a stock SDXL pipeline."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from fewstep.methods.diff2flow import (bridge_timestep, bridge_velocity, flow_to_diffusion_input, sigma_range,
                                       sigma_table)
from fewstep.schedulers import TwinFlowScheduler
from fewstep.schedulers.twinflow import twinflow_preset

SDXL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SHAPE = (2, 2, 3, 3)
S = 0.5  # data std of the analytic model


def sdxl_euler(**kw):
    return EulerDiscreteScheduler(**SDXL, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# analytic Gaussian data x ~ N(mu, S^2) (as tests/methods/test_diff2flow.py): exact eps / v and flow predictions

def gaussian_models(mu, abar):
    """Exact epsilon- and v-predictions at diffusion input x_k and a continuous timestep (sigma interpolated over the
    index table, the inverse of the bridge's timestep lookup)."""
    table = sigma_table(abar).numpy()

    def coeffs(x, timestep):
        sig = torch.from_numpy(np.interp(np.asarray(timestep, dtype=np.float64).reshape(-1), np.arange(len(table)),
                                         table)).reshape(-1, 1, 1, 1)
        ab = (1 - sig) ** 2 / ((1 - sig) ** 2 + sig**2)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        r = x - a * mu
        var = a**2 * S**2 + b**2
        return a, b, b * r / var, mu + a * S**2 * r / var  # a, b, E[eps|x_k], E[x|x_k]

    def eps_model(x, timestep):
        return coeffs(x, timestep)[2]

    def v_model(x, timestep):
        a, b, eps, x0 = coeffs(x, timestep)
        return a * eps - b * x0

    return {"epsilon": eps_model, "v_prediction": v_model}


def exact_flow_velocity(x, sigma, mu):
    """E[z - x | x_sigma] for x_sigma = sigma z + (1 - sigma) x."""
    var = sigma**2 + (1 - sigma) ** 2 * S**2
    r = x - (1 - sigma) * mu
    return sigma * r / var - (mu + (1 - sigma) * S**2 * r / var)


def diffusion_loop(sched, x, model, seed=0, record=None):
    """What a diffusers pipeline does: scale_model_input -> model -> step, with the pipeline's timesteps."""
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        x = sched.step(model(inp, t), t, x, generator=g).prev_sample
        if record is not None:
            record.append(x)
    return x


def flow_loop(sched, x, mu, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(exact_flow_velocity(x, sched.sigmas[i], mu), t, x, generator=g).prev_sample
    return x


# ----------------------------------------------------------------------------------------------------------------------

def test_from_config_of_diffusers_schedulers():
    euler = sdxl_euler()
    s = TwinFlowScheduler.from_config(euler.config, **twinflow_preset(1))  # extra keys are ignored
    assert s.config.prediction_type == "epsilon" and s.is_diffusion and s.init_noise_sigma == 1.0
    assert torch.equal(s.alphas_cumprod, euler.alphas_cumprod)
    assert s.config.target_time == "any" and s.config.stochastic_ratio == 0.0
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    v = TwinFlowScheduler.from_config(ddpm.config)
    assert v.config.prediction_type == "v_prediction" and torch.equal(v.alphas_cumprod, ddpm.alphas_cumprod)
    ddim = DDIMScheduler(**SDXL, prediction_type="v_prediction")
    d = TwinFlowScheduler.from_config(ddim.config, prediction_type="epsilon")  # an override wins
    assert d.config.prediction_type == "epsilon" and torch.equal(d.alphas_cumprod, ddim.alphas_cumprod)
    betas = torch.linspace(1e-3, 0.05, 50).tolist()
    t = TwinFlowScheduler.from_config(DDPMScheduler(num_train_timesteps=50, trained_betas=betas).config,
                                      prediction_type="epsilon")
    assert torch.equal(t.alphas_cumprod, DDPMScheduler(num_train_timesteps=50, trained_betas=betas).alphas_cumprod)
    z = EulerDiscreteScheduler(**SDXL, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert torch.equal(TwinFlowScheduler.from_config(z.config).alphas_cumprod, z.alphas_cumprod)
    # no beta info: diffusers' defaults (linear 1e-4 .. 0.02)
    assert torch.equal(TwinFlowScheduler(prediction_type="epsilon").alphas_cumprod, DDPMScheduler().alphas_cumprod)
    assert TwinFlowScheduler().alphas_cumprod is None
    with pytest.raises(ValueError, match=r"beta_schedule='cosine'.*scaled_linear"):
        TwinFlowScheduler(prediction_type="epsilon", beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        TwinFlowScheduler.from_config(DDPMScheduler(prediction_type="sample").config)


def test_schedule_keeps_flow_sigmas_and_bridges_timesteps(tmp_path):
    s = TwinFlowScheduler(**SDXL, prediction_type="epsilon", target_time="any")
    f = TwinFlowScheduler(target_time="any")
    abar = s.alphas_cumprod
    for n in (1, 2, 4, 8):
        s.set_timesteps(n), f.set_timesteps(n)
        assert torch.equal(s.sigmas, f.sigmas) and torch.equal(s.target_times(), f.target_times())
        assert s.timesteps.dtype == torch.float32
        torch.testing.assert_close(s.timesteps, bridge_timestep(s.sigmas[:-1], abar).float(), rtol=0, atol=0)
    assert s.timesteps[0] == 999.0 and s.timesteps[-1] < 999.0
    # explicit timesteps are the base's: sigma = their flow sigma
    s.set_timesteps(timesteps=[999, 500, 100])
    torch.testing.assert_close(s.sigmas[:-1], sigma_table(abar)[[999, 500, 100]])
    torch.testing.assert_close(s.timesteps, torch.tensor([999.0, 500.0, 100.0]))
    # img2img: add_noise gives the flow state at the step's flow sigma
    x, n = torch.randn(2, 3), torch.randn(2, 3)
    sig = float(s.sigmas[1])
    torch.testing.assert_close(s.add_noise(x, n, s.timesteps[1:2].expand(2)), sig * n + (1 - sig) * x)
    # config round trip
    s.save_config(tmp_path)
    r = TwinFlowScheduler.from_pretrained(tmp_path)
    assert r.config.beta_schedule == "scaled_linear" and torch.equal(r.alphas_cumprod, s.alphas_cumprod)
    # flow types: scale_model_input is the identity
    x = torch.randn(2, 3)
    f.set_timesteps(2)
    assert f.scale_model_input(x, f.timesteps[0]) is x and f.step_index is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n,settings", [(1, {}), (2, {}), (4, {}), (4, dict(target_time="few", stochastic_ratio=1.0)),
                                        (3, dict(target_time="mul", stochastic_ratio=0.4, shift=2.0, gap_start=0.25)),
                                        (6, dict(kumaraswamy=(1.17, 0.8, 1.1), gap_end=0.1, gap_start=0.25))])
def test_sampling_matches_flow_sampler_on_exact_velocity(prediction_type, n, settings):
    """Inside the base's range the bridged sampler is the flow sampler on the exact flow velocity."""
    torch.manual_seed(0)
    kw = {**twinflow_preset(n), "gap_start": 0.1, **settings}  # the first sigma below hi: all inside the range
    s = TwinFlowScheduler(**SDXL, prediction_type=prediction_type, **kw)
    f = TwinFlowScheduler(**kw)
    s.set_timesteps(n), f.set_timesteps(n)
    lo, hi = sigma_range(s.alphas_cumprod)
    assert lo < float(s.sigmas[-2]) and float(s.sigmas[0]) < hi
    mu = torch.randn(1, *SHAPE[1:], dtype=torch.float64)
    model = gaussian_models(mu, s.alphas_cumprod)[prediction_type]
    x = torch.randn(SHAPE, dtype=torch.float64)
    out = diffusion_loop(s, x, model, seed=5)
    ref = flow_loop(f, x, mu, seed=5)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert (out - x).abs().max() > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_first_step_from_pure_noise_is_the_ddim_x0_estimate(prediction_type):
    torch.manual_seed(1)
    mu = torch.randn(1, *SHAPE[1:], dtype=torch.float64)
    z = torch.randn(SHAPE, dtype=torch.float64)
    s = TwinFlowScheduler(**SDXL, prediction_type=prediction_type, gap_start=0.0, **twinflow_preset(3))
    abar = s.alphas_cumprod.double()
    model = gaussian_models(mu, abar)[prediction_type]
    a, b = abar[-1].sqrt(), (1 - abar[-1]).sqrt()
    out = model(z, torch.tensor(999.0))
    x0_ddim = (z - b * out) / a if prediction_type == "epsilon" else a * z - b * out
    s.set_timesteps(1)
    assert s.sigmas.tolist() == [1.0, 0.0]
    torch.testing.assert_close(diffusion_loop(s, z, model), x0_ddim, rtol=1e-9, atol=1e-9)  # x - 1 * F = x0_hat
    # 3 steps: sigma = 1 is above the range (the rule above), then the exact flow sampler
    s.set_timesteps(3)
    states = []
    diffusion_loop(s, z, model, record=states)
    sig1 = float(s.sigmas[1])
    torch.testing.assert_close(states[0], x0_ddim + sig1 * (z - x0_ddim), rtol=1e-9, atol=1e-9)
    f = TwinFlowScheduler(gap_start=0.0, **twinflow_preset(3))
    f.set_timesteps(3)
    f.set_begin_index(1)
    x = states[0]
    for i in (1, 2):
        x = f.step(exact_flow_velocity(x, f.sigmas[i], mu), f.timesteps[i], x).prev_sample
    torch.testing.assert_close(states[-1], x, rtol=1e-6, atol=1e-6)


def test_repeated_clamped_timesteps_count_steps():
    """sigmas 1.0 and 0.95 both map to timestep 999 on SDXL: the step index is counted, not looked up."""
    s = TwinFlowScheduler(**SDXL, prediction_type="epsilon", sigmas_policy="always", stochastic_ratio=0.0)
    mu = torch.zeros(1, *SHAPE[1:], dtype=torch.float64)
    model = gaussian_models(mu, s.alphas_cumprod)["epsilon"]
    x = torch.randn(SHAPE, dtype=torch.float64)
    results = []
    for use_scale in (True, False):
        s.set_timesteps(sigmas=[1.0, 0.95, 0.5])
        assert s.timesteps[:2].tolist() == [999.0, 999.0] and s.index_for_timestep(s.timesteps[1]) == 0
        y, seen = x, []
        for t in s.timesteps:
            inp = s.scale_model_input(y, t) if use_scale else flow_to_diffusion_input(y, s.sigmas[len(seen)][None])
            seen.append(float(s.sigmas[s.step_index]) if use_scale else None)
            y = s.step(model(inp, t), t, y).prev_sample
        assert s.step_index == 3
        if use_scale:
            assert seen == [1.0, 0.95, 0.5]
        results.append(y)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    # by hand: Euler on the bridged velocity
    y = x
    sig = [1.0, 0.95, 0.5, 0.0]
    for i in range(3):
        sg = torch.tensor([sig[i]], dtype=torch.float64)
        ts = bridge_timestep(sg, s.alphas_cumprod).float()
        F = bridge_velocity(model(flow_to_diffusion_input(y, sg), ts), y, sg, s.alphas_cumprod, "epsilon")
        y = y + (sig[i + 1] - sig[i]) * F
    torch.testing.assert_close(results[0], y, rtol=1e-9, atol=1e-9)


def test_begin_index_picks_the_step_among_repeated_clamped_timesteps():
    """sigmas 1.0 and 0.95 share timestep 999 on SDXL: img2img's set_begin_index(1) must start from sigmas[1], which
    a timestep lookup (first match, step 0) cannot tell apart."""
    s = TwinFlowScheduler(**SDXL, prediction_type="epsilon", sigmas_policy="always", stochastic_ratio=0.0)
    s.set_timesteps(sigmas=[1.0, 0.95, 0.5])
    assert s.timesteps[:2].tolist() == [999.0, 999.0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)  # any base output
    s.set_begin_index(1)
    y = s.step(eps, s.timesteps[1], x).prev_sample
    # by hand, Euler from 0.95 to 0.5: 0.95 is above the base's range, so x0_hat is the last timestep's estimate
    # from x_k = x / sqrt(0.05^2 + 0.95^2), and x' = x0_hat + (0.5 / 0.95) (x - x0_hat)
    abar = s.alphas_cumprod.double()
    a, b = abar[-1].sqrt(), (1 - abar[-1]).sqrt()
    x0 = (x / math.sqrt(0.05**2 + 0.95**2) - b * eps) / a
    torch.testing.assert_close(y, x0 + (0.5 / 0.95) * (x - x0), rtol=1e-9, atol=1e-9)
    assert s.step_index == 2


# ----------------------------------------------------------------------------------------------------------------------
# a stock StableDiffusionXLPipeline with a tiny UNet

def tiny_sdxl_pipeline():
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fewstep.models.tiny import vocabulary, word_tokenizer

    v = vocabulary()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(16, 32),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                    cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=6 * 8 + 16)

        def clip(with_projection):
            cfg = CLIPTextConfig(vocab_size=len(v), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                 bos_token_id=v["<s>"], eos_token_id=v["</s>"], pad_token_id=v["</s>"])
            return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)

        te1, te2 = clip(False), clip(True)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=16)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=word_tokenizer("clip", 16), tokenizer_2=word_tokenizer("clip", 16),
                                     unet=unet, scheduler=sdxl_euler())


@pytest.fixture(scope="module")
def sdxl_pipe():
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
@pytest.mark.parametrize("n", [1, 2])
def test_stock_sdxl_pipeline_matches_hand_loop(sdxl_pipe, n):
    pipe = sdxl_pipe
    pipe.scheduler = TwinFlowScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon",
                                                   **twinflow_preset(n))
    B, H = 2, 16
    emb, pooled = torch.randn(B, 7, 32), torch.randn(B, 16)
    out = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=n, guidance_scale=1.0, height=H,
               width=H, output_type="latent", generator=torch.Generator().manual_seed(3)).images
    assert out.shape == (B, 4, H // 2, H // 2) and torch.isfinite(out).all()
    # by hand: the pipeline's initial latents, then UNet on the bridged input and timestep, Euler on the velocity
    x = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    x_start = x
    abar = pipe.scheduler.alphas_cumprod
    time_ids = torch.tensor([[H, H, 0, 0, H, H]], dtype=torch.float32).repeat(B, 1)
    sig = pipe.scheduler.sigmas.tolist()
    assert sig[0] == 0.999 and len(sig) == n + 1
    for i in range(n):
        sg = torch.tensor([sig[i]], dtype=torch.float64)
        t = bridge_timestep(sg, abar).float()[0]
        eps = pipe.unet(flow_to_diffusion_input(x, sg), t, encoder_hidden_states=emb,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
        F = bridge_velocity(eps.double(), x.double(), sg, abar, "epsilon")
        x = (x.double() + (sig[i + 1] - sig[i]) * F).float()
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert (out - x_start).abs().max() > 0.1


@torch.no_grad()
def test_stock_sdxl_pipeline_with_prompt_and_guidance(sdxl_pipe):
    pipe = sdxl_pipe
    pipe.scheduler = TwinFlowScheduler.from_config(pipe.scheduler.config, **twinflow_preset(1))
    assert pipe.scheduler.config.prediction_type == "epsilon"  # carried over from the pipeline's scheduler
    img = pipe("a red cube", num_inference_steps=1, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
    lat = pipe("a red cube", num_inference_steps=1, output_type="latent").images
    assert torch.isfinite(lat).all() and not math.isnan(float(lat.std()))
