"""TwinFlowScheduler: UCGM grid, step rule, diffusers scheduler API, and real tiny Flux / SD3 / Qwen-Image pipelines."""
import math

import numpy as np
import pytest
import torch

from fewstep.schedulers import TwinFlowScheduler

# the sigma table of the notes (UCGM gaps 0.001 / 0.6, 0.5 by N), 4 decimals
NOTES_SIGMAS = {1: [0.999, 0.0], 2: [0.999, 0.6, 0.0], 3: [0.999, 0.7495, 0.5, 0.0],
                4: [0.999, 0.8327, 0.6663, 0.5, 0.0]}


def toy_velocity(x, sigma):
    return torch.sin(3 * x) * (1 + sigma) - 0.5 * x


def run_scheduler(sched, x, generator=None):
    for t in sched.timesteps:
        sigma = float(t) / 1000
        x = sched.step(toy_velocity(x, sigma), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sigmas_match_the_notes_table(n):
    s = TwinFlowScheduler()
    s.set_timesteps(n)
    assert s.sigmas.dtype == torch.float64 and len(s.timesteps) == n
    np.testing.assert_allclose(s.sigmas.numpy(), NOTES_SIGMAS[n], atol=6e-5, rtol=0)
    torch.testing.assert_close(s.timesteps, (torch.tensor(NOTES_SIGMAS[n][:-1]) * 1000), atol=0.06, rtol=0)


def test_grid_options():
    s = TwinFlowScheduler(gap_end=0.0, gap_start=0.0)
    s.set_timesteps(4)  # N + 1 points on [0, 1], last dropped
    np.testing.assert_allclose(s.sigmas.numpy(), [1.0, 0.75, 0.5, 0.25, 0.0])
    s = TwinFlowScheduler(gap_end=0.3)
    s.set_timesteps(8)
    u = np.linspace(0.001, 0.7, 8)
    np.testing.assert_allclose(s.sigmas.numpy()[:-1], 1 - u)
    a, b, c = 1.17, 0.8, 1.1
    s = TwinFlowScheduler(kumaraswamy=(a, b, c), gap_end=0.0)
    s.set_timesteps(30)
    u = np.linspace(0.001, 1.0, 31)[:-1]
    np.testing.assert_allclose(s.sigmas.numpy()[:-1], 1 - (1 - (1 - u**a) ** b) ** c)


def test_euler_when_not_stochastic():
    s = TwinFlowScheduler(stochastic_ratio=0.0)
    s.set_timesteps(4)
    x0 = torch.randn(2, 3, 5)
    out = run_scheduler(s, x0)
    x = x0.double()
    sig = list(NOTES_SIGMAS[4])
    sig[1:4] = [1 - (0.001 + k * (0.499 / 3)) for k in (1, 2, 3)]  # exact values of the rounded table
    for i in range(4):
        sigma = float(torch.tensor(sig[i] * 1000, dtype=torch.float32)) / 1000  # what the model sees
        x = x + (sig[i + 1] - sig[i]) * toy_velocity(x.float(), sigma).double()
        x = x.float().double()
    torch.testing.assert_close(out, x.float(), rtol=1e-6, atol=1e-6)


def test_stochastic_step_renoises_predicted_data():
    s = TwinFlowScheduler(stochastic_ratio=0.3)
    s.set_timesteps(2)
    x0 = torch.randn(2, 3, 5)
    out = run_scheduler(s, x0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x, sig = x0, s.sigmas.tolist()
    for i in range(2):
        F = toy_velocity(x, float(s.timesteps[i]) / 1000).double()
        xd = x.double()
        x_hat, z_hat = xd - sig[i] * F, xd + (1 - sig[i]) * F
        eps = torch.randn(x.shape, generator=g).double()
        x = ((1 - sig[i + 1]) * x_hat + sig[i + 1] * (math.sqrt(0.7) * z_hat + math.sqrt(0.3) * eps)).float()
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    # reversed prediction type: the model gives x - z, the result is the same sampler
    r = TwinFlowScheduler(stochastic_ratio=0.0, prediction_type="flow_matching_reversed")
    e = TwinFlowScheduler(stochastic_ratio=0.0)
    r.set_timesteps(2), e.set_timesteps(2)
    xr = x0
    for t in r.timesteps:
        xr = r.step(-toy_velocity(xr, float(t) / 1000), t, xr).prev_sample
    torch.testing.assert_close(xr, run_scheduler(e, x0), rtol=0, atol=0)


def test_sigmas_mu_timesteps_and_shift():
    s = TwinFlowScheduler()
    s.set_timesteps(sigmas=[1.0, 0.25], mu=0.7)  # explicit sigmas: verbatim + terminal 0 (mu unused: static)
    assert s.sigmas.tolist() == [1.0, 0.25, 0.0] and s.timesteps.tolist() == [1000.0, 250.0]
    s.set_timesteps(2, sigmas=np.linspace(1.0, 0.5, 2), mu=0.7)  # the Flux/Qwen pipeline default -> UCGM grid
    np.testing.assert_allclose(s.sigmas.numpy(), NOTES_SIGMAS[2])
    s.set_timesteps(sigmas=[1.0, 0.5])  # the same grid without mu (SD3 / SDXL pipelines): the caller's own, verbatim
    assert s.sigmas.tolist() == [1.0, 0.5, 0.0]
    a = TwinFlowScheduler(sigmas_policy="always")
    a.set_timesteps(sigmas=[1.0, 0.5])
    assert a.sigmas.tolist() == [1.0, 0.5, 0.0]
    i = TwinFlowScheduler(sigmas_policy="ignore")
    i.set_timesteps(sigmas=[1.0, 0.25])
    np.testing.assert_allclose(i.sigmas.numpy(), NOTES_SIGMAS[2])
    s.set_timesteps(timesteps=[800.0, 300.0])
    np.testing.assert_allclose(s.sigmas.numpy(), [0.8, 0.3, 0.0])
    # static shift k: sigma' = k sigma / (1 + (k - 1) sigma)
    k = 3.0
    s = TwinFlowScheduler(shift=k)
    s.set_timesteps(3)
    base = np.array(NOTES_SIGMAS[3][:-1])
    np.testing.assert_allclose(s.sigmas.numpy()[:-1], k * base / (1 + (k - 1) * base), atol=2e-4)
    # dynamic exponential shift with mu
    mu = 0.9
    d = TwinFlowScheduler(use_dynamic_shifting=True)
    d.set_timesteps(3, mu=mu)
    np.testing.assert_allclose(d.sigmas.numpy()[:-1], math.exp(mu) / (math.exp(mu) + (1 / base - 1)), atol=2e-4)
    with pytest.raises(ValueError, match="mu"):
        d.set_timesteps(3)
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        s.set_timesteps(3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        TwinFlowScheduler(sigmas_policy="always").set_timesteps(sigmas=[0.5, 0.7])


# The released bases' scheduler configs (their scheduler/scheduler_config.json, the keys that move the grid)
STOCK_FLOW_SCHEDULERS = {
    "flux": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096),
    "sd3": dict(shift=3.0),
    "qwen_image": dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                       max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"),
}


@pytest.mark.parametrize("family", sorted(STOCK_FLOW_SCHEDULERS))
@pytest.mark.parametrize("n", [1, 2, 4])
def test_from_a_stock_config_the_preset_samples_the_training_grid(family, n):
    """`from_config(pipe.scheduler.config, **twinflow_preset(n))` (the README's idiom) samples the unshifted grid
    TwinFlow trains on and validates with, whatever shift the base's config carries: Qwen-Image's shift_terminal
    once moved a 1-step sample's only sigma to 0.02 (pure noise in, noise out), FLUX's and SD3's shifts moved the
    others."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.schedulers.twinflow import twinflow_preset

    stock = FlowMatchEulerDiscreteScheduler(**STOCK_FLOW_SCHEDULERS[family])
    s = TwinFlowScheduler.from_config(stock.config, **twinflow_preset(n))
    # as the Flux / Qwen-Image pipelines call it: their default sigmas, and mu for the image size
    s.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=0.93)
    np.testing.assert_allclose(s.sigmas.numpy(), NOTES_SIGMAS[n], atol=1e-4)


def test_target_times():
    for mode, expected in (("few", [0.0, 0.0]), ("any", [0.6, 0.0]), ("mul", [0.999, 0.6])):
        s = TwinFlowScheduler(target_time=mode)
        s.set_timesteps(2)
        np.testing.assert_allclose(s.target_times().numpy(), expected)


def test_config_roundtrip_and_errors(tmp_path):
    s = TwinFlowScheduler(shift=2.0, kumaraswamy=(1.17, 0.8, 1.1), target_time="any", stochastic_ratio=0.0)
    s.save_config(tmp_path)
    r = TwinFlowScheduler.from_pretrained(tmp_path)
    assert r.config.shift == 2.0 and list(r.config.kumaraswamy) == [1.17, 0.8, 1.1] and r.config.target_time == "any"
    s.set_timesteps(5), r.set_timesteps(5)
    assert torch.equal(s.sigmas, r.sigmas)
    for kw, msg in (({"prediction_type": "sample"}, "prediction_type='sample'"),
                    ({"target_time": "fast"}, "target_time='fast'"), ({"stochastic_ratio": 1.5}, "stochastic_ratio"),
                    ({"kumaraswamy": (1, 1)}, "kumaraswamy")):
        with pytest.raises(ValueError, match=msg):
            TwinFlowScheduler(**kw)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="integer index"):
        s.step(torch.zeros(1), 0, torch.zeros(1))
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(torch.zeros(1), torch.tensor(123.0), torch.zeros(1))


def test_scale_noise_and_begin_index():
    s = TwinFlowScheduler()
    s.set_timesteps(3)
    x, n = torch.randn(2, 4), torch.randn(2, 4)
    t = s.timesteps[1]
    sig = float(s.sigmas[1])
    torch.testing.assert_close(s.scale_noise(x, t.expand(2), n), sig * n + (1 - sig) * x)
    s.set_begin_index(1)  # img2img starts part-way
    s.step(torch.zeros(2, 4), s.timesteps[1], x)
    assert s.step_index == 2


@pytest.mark.parametrize("settings,mu", [(dict(shift=3.0, shift_terminal=0.1), None),
                                         (dict(use_dynamic_shifting=True, time_shift_type="linear"), 1.7),
                                         (dict(use_dynamic_shifting=True, time_shift_type="linear",
                                               shift_terminal=0.02), 0.6)])
def test_given_sigmas_are_shifted_as_diffusers_does(settings, mu):
    """Given sigmas go through diffusers' own shift (shift_terminal stretch, linear dynamic shift): a stock Flux /
    Qwen-Image / SD3 config swapped to TwinFlow must sample the grid the base's own scheduler would."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = [1.0, 0.8, 0.55, 0.3, 0.12]
    ref = FlowMatchEulerDiscreteScheduler(**settings)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    s = TwinFlowScheduler(sigmas_policy="always", **settings)
    s.set_timesteps(sigmas=sigmas, mu=mu)
    np.testing.assert_allclose(s.sigmas.numpy(), ref.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)
    if settings.get("shift_terminal"):
        assert math.isclose(float(s.sigmas[-2]), settings["shift_terminal"], rel_tol=1e-12)  # the stretch's target


def test_scale_noise_inside_the_loop_uses_the_current_step_as_diffusers():
    """After set_begin_index and a step, scale_noise (inpainting re-noising the known region each step) uses the
    current step's sigma, as diffusers does; the begin index would re-noise to the starting sigma every step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = [1.0, 0.75, 0.5, 0.25]
    s = TwinFlowScheduler(sigmas_policy="always", stochastic_ratio=0.0)
    ref = FlowMatchEulerDiscreteScheduler()
    g = torch.Generator().manual_seed(4)
    x, n, v = (torch.randn(2, 4, generator=g) for _ in range(3))
    for sched in (s, ref):
        sched.set_timesteps(sigmas=sigmas)
        sched.set_begin_index(0)
        sched.step(v, sched.timesteps[0], x)
    assert s.step_index == ref.step_index == 1
    t = s.timesteps[1:2].expand(2)
    torch.testing.assert_close(s.scale_noise(x, t, n), ref.scale_noise(x, t, n))
    torch.testing.assert_close(s.scale_noise(x, t, n), 0.75 * n + 0.25 * x)


def test_repeated_sigmas_are_rejected():
    """Given sigmas must be strictly decreasing: a repeated sigma is a zero-length step (a wasted model call) and
    makes the step index ambiguous, so it is an error rather than accepted silently."""
    with pytest.raises(ValueError, match="strictly decreasing"):
        TwinFlowScheduler(sigmas_policy="always").set_timesteps(sigmas=[1.0, 0.5, 0.5])


# ----------------------------------------------------------------------------------------------------------------------
# real tiny diffusers pipelines

def ucgm_loop(x, sigmas, velocity, s_ratio):
    """Hand-written UCGM sampler: the model sees sigma through fp32 timesteps sigma * 1000."""
    for i in range(len(sigmas) - 1):
        t = torch.tensor(sigmas[i] * 1000, dtype=torch.float32)
        F = velocity(x, t).double()
        xd = x.double()
        x_hat, z_hat = xd - sigmas[i] * F, xd + (1 - sigmas[i]) * F
        eps = torch.randn(x.shape, dtype=torch.float32).double()
        z_mix = math.sqrt(1 - s_ratio) * z_hat + math.sqrt(s_ratio) * eps
        x = ((1 - sigmas[i + 1]) * x_hat + sigmas[i + 1] * z_mix).to(x.dtype)
    return x


@pytest.fixture(scope="module")
def diffusers_mod():
    return pytest.importorskip("diffusers")


def tiny_vae(diffusers_mod):
    torch.manual_seed(0)
    return diffusers_mod.AutoencoderKL(sample_size=32, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
                                       norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)


@torch.no_grad()
def test_flux_pipeline_matches_hand_loop(diffusers_mod):
    torch.manual_seed(0)
    tr = diffusers_mod.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                               pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    pipe = diffusers_mod.FluxPipeline(scheduler=diffusers_mod.FlowMatchEulerDiscreteScheduler(),
                                      vae=tiny_vae(diffusers_mod), text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.scheduler = TwinFlowScheduler()  # swapped in on a loaded pipeline, as users do
    B, H = 2, 8
    emb, pooled = torch.randn(B, 5, 32), torch.randn(B, 32)
    latents = torch.randn(B, (H // 2) ** 2, 4)
    img_ids = diffusers_mod.FluxPipeline._prepare_latent_image_ids(B, H // 2, H // 2, "cpu", torch.float32)

    def velocity(x, t):
        return tr(hidden_states=x, timestep=t.expand(B) / 1000, pooled_projections=pooled, encoder_hidden_states=emb,
                  txt_ids=torch.zeros(5, 3), img_ids=img_ids, return_dict=False)[0]

    for sigmas, expected in ((None, [0.999, 0.6, 0.0]), ([1.0, 0.25], [1.0, 0.25, 0.0])):
        torch.manual_seed(11)
        out = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=2, sigmas=sigmas, height=H,
                   width=H, latents=latents, output_type="latent").images
        torch.manual_seed(11)
        ref = ucgm_loop(latents, [1 - 0.001, 1 - 0.4, 0.0] if sigmas is None else expected, velocity, 1.0)
        np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), expected, atol=1e-12)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert (out - latents).abs().max() > 0.1  # the sampler moved the latents


@torch.no_grad()
def test_sd3_pipeline_matches_hand_loop(diffusers_mod):
    torch.manual_seed(0)
    tr = diffusers_mod.SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=4,
                                              attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                              joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    pipe = diffusers_mod.StableDiffusion3Pipeline(transformer=tr, scheduler=TwinFlowScheduler(stochastic_ratio=0.0),
                                                  vae=tiny_vae(diffusers_mod), text_encoder=None, tokenizer=None,
                                                  text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                                  tokenizer_3=None)
    B, H = 2, 8
    emb, pooled = torch.randn(B, 6, 32), torch.randn(B, 64)
    latents = torch.randn(B, 4, H, H)

    def velocity(x, t):  # SD3 takes timesteps in [0, 1000]
        return tr(hidden_states=x, timestep=t.expand(B), encoder_hidden_states=emb, pooled_projections=pooled,
                  return_dict=False)[0]

    out = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=3, guidance_scale=1.0, height=H,
               width=H, latents=latents, output_type="latent").images
    ref = ucgm_loop(latents, [0.999, 1 - 0.2505, 0.5, 0.0], velocity, 0.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_qwen_image_pipeline_matches_hand_loop(diffusers_mod):
    torch.manual_seed(0)
    tr = diffusers_mod.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                    attention_head_dim=16, num_attention_heads=4,
                                                    joint_attention_dim=16, guidance_embeds=False,
                                                    axes_dims_rope=(8, 4, 4))
    vae = diffusers_mod.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                               temperal_downsample=[False, True], latents_mean=[0] * 4,
                                               latents_std=[1] * 4)
    pipe = diffusers_mod.QwenImagePipeline(scheduler=TwinFlowScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                           transformer=tr)
    B, H = 1, 16
    emb, mask = torch.randn(B, 7, 16), torch.ones(B, 7, dtype=torch.long)
    f = pipe.vae_scale_factor
    latents = torch.randn(B, (H // f // 2) ** 2, 16)

    def velocity(x, t):
        return tr(hidden_states=x, timestep=t.expand(B) / 1000, encoder_hidden_states=emb,
                  encoder_hidden_states_mask=mask, img_shapes=[[(1, H // f // 2, H // f // 2)]] * B,
                  return_dict=False)[0]

    torch.manual_seed(3)
    out = pipe(prompt_embeds=emb, prompt_embeds_mask=mask, num_inference_steps=2, height=H, width=H, latents=latents,
               output_type="latent").images
    torch.manual_seed(3)
    ref = ucgm_loop(latents, [0.999, 1 - 0.4, 0.0], velocity, 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
