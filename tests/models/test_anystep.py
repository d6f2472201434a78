"""Any-step (TwinFlow) embeddings: zero-init identity, sign/tt effects, per-family time convention, state, I/O."""
import copy

import pytest
import torch
from conftest import FAMILY_NAMES
from diffusers.models.embeddings import get_timestep_embedding

from fewstep.models import (
    ANYSTEP_WEIGHTS_NAME,
    anystep_state,
    anystep_state_dict,
    get_adapter,
    load_anystep,
    load_anystep_state_dict,
    save_anystep,
    set_anystep_state,
)
from fewstep.models.anystep import timestep_sinusoid


def _setup(tiny, family):
    adapter, comps = tiny(family)
    transformer = copy.deepcopy(comps.denoiser)  # the session components stay unmodified
    cond = adapter.encode_prompts(comps, ["a red cat", "two blue dogs"])
    g = torch.Generator().manual_seed(7)
    x = torch.randn(adapter.encode_images(comps.vae, torch.zeros(2, 3, 32, 32)).shape, generator=g)
    return adapter, transformer, cond, x


def _randomize(embed, scale=0.5):
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in embed.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_zero_init_is_bit_identical_then_inputs_matter(tiny, family):
    adapter, tr, cond, x = _setup(tiny, family)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        base = adapter.forward(tr, x, sigma, cond)
        embed = adapter.add_anystep(tr)
        assert tr.anystep_embed is embed and adapter.add_anystep(tr) is embed  # idempotent
        zero = adapter.forward(tr, x, sigma, cond, tt=torch.tensor([0.0, 0.5]), sign=torch.tensor([-1.0, 1.0]))
        assert torch.equal(zero, base)
        _randomize(embed)
        assert torch.equal(adapter.forward(tr, x, sigma, cond), base)  # no state: hook leaves output untouched
        plus = adapter.forward(tr, x, sigma, cond, tt=0.0, sign=1.0)
        minus = adapter.forward(tr, x, sigma, cond, tt=0.0, sign=-1.0)
        other_tt = adapter.forward(tr, x, sigma, cond, tt=0.2, sign=1.0)
    assert not torch.allclose(plus, minus) and not torch.allclose(plus, other_tt)
    assert embed.tt is None and embed.sign is None  # reset after forward
    # per-sample: a [B] sign only changes the rows it flips
    with torch.no_grad():
        mixed = adapter.forward(tr, x, sigma, cond, tt=0.0, sign=torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(mixed[0], plus[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], minus[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_time_convention_tt_equal_t_cancels(tiny, family):
    """E2(tt) * (t - tt) vanishes at tt = t only if t is read on the right scale (hook_time_scale)."""
    adapter, tr, cond, x = _setup(tiny, family)
    sigma = torch.tensor([0.3, 0.8])
    embed = adapter.add_anystep(tr)
    _randomize(embed)
    with torch.no_grad():
        embed.sign_embed.weight.zero_()
        base = adapter.forward(tr, x, sigma, cond)
        same = adapter.forward(tr, x, sigma, cond, tt=sigma.clone())
        half = adapter.forward(tr, x, sigma, cond, tt=sigma * 0.5)
    torch.testing.assert_close(same, base, rtol=1e-4, atol=1e-4)
    assert (half - base).norm() > 100 * (same - base).norm() + 1e-3


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_tt_equal_t_is_exactly_flow_matching(tiny, tiny_dirs, family):
    """In a bf16 model the transformer's timestep is sigma rounded to bf16, tt stays fp32: t must be the fp32 sigma,
    or tt = t leaves a spurious E2(tt) * (t - tt). Sigmas not representable in bf16 (0.93 -> 0.9297)."""
    adapter, _, cond, x = _setup(tiny, family)
    tr = adapter.load(tiny_dirs(family), dtype=torch.bfloat16, with_text=False, with_vae=False).denoiser
    embed = adapter.add_anystep(tr)
    _randomize(embed)  # E2's zero-initialised last layer would hide the term
    x, cond = x.bfloat16(), {k: v.bfloat16() if v.is_floating_point() else v for k, v in cond.items()}
    sigma = torch.tensor([0.93, 0.37])
    assert not torch.equal(sigma.bfloat16().float(), sigma)
    with torch.no_grad():
        for sign in (None, torch.tensor([1.0, -1.0])):
            no_tt = adapter.forward(tr, x, sigma, cond, sign=sign)
            same = adapter.forward(tr, x, sigma, cond, tt=sigma.clone(), sign=sign)
            assert torch.equal(same, no_tt), (sign, (same.float() - no_tt.float()).abs().max())
            assert embed.tt is None and embed.sign is None and embed.t is None  # cleared after each call
        # the term is live: tt != t moves the output
        assert not torch.equal(adapter.forward(tr, x, sigma, cond, tt=sigma - 0.05, sign=sign), no_tt)


def test_hook_adds_reference_terms(tiny):
    """The hooked time embedding = stock output + sign_embed[sign<0] + E2(tt) * (t - tt), against a float64 reference."""
    adapter, tr, cond, x = _setup(tiny, "sd3")
    embed = adapter.add_anystep(tr)
    _randomize(embed)
    t, tt, sign = torch.tensor([0.9, 0.4]), torch.tensor([0.1, 0.4]), torch.tensor([-1.0, 1.0])
    pooled = cond["pooled_prompt_embeds"]
    with torch.no_grad():
        stock = tr.time_text_embed(t * 1000, pooled)
        with anystep_state(tr, tt, sign):
            hooked = tr.time_text_embed(t * 1000, pooled)
    sd = {k: v.double() for k, v in embed.state_dict().items()}
    freq = get_timestep_embedding(tt.double() * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0).double()
    h = freq @ sd["tt_linear_1.weight"].T + sd["tt_linear_1.bias"]
    e2 = (h * torch.sigmoid(h)) @ sd["tt_linear_2.weight"].T + sd["tt_linear_2.bias"]
    ref = stock.double() + sd["sign_embed.weight"][(sign < 0).long()] + e2 * (t - tt).double()[:, None]
    torch.testing.assert_close(hooked.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(timestep_sinusoid(tt * 1000), freq.float(), rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_sign_rows_and_tt_embedding(tiny):
    adapter, tr, cond, x = _setup(tiny, "flux")
    embed = adapter.add_anystep(tr)
    _randomize(embed, 0.1)
    v = adapter.forward(tr, x, torch.tensor([0.6, 0.6]), cond, tt=torch.tensor([0.1, 0.3]),
                        sign=torch.tensor([1.0, -1.0]))
    v.square().mean().backward()
    assert (embed.sign_embed.weight.grad.abs().sum(dim=1) > 0).all()
    assert embed.tt_linear_1.weight.grad.abs().sum() > 0 and embed.tt_linear_2.weight.grad.abs().sum() > 0


def test_state_is_reset_on_error_and_validated(tiny):
    adapter, tr, cond, x = _setup(tiny, "qwenimage")
    embed = adapter.add_anystep(tr)
    with pytest.raises(RuntimeError, match="boom"):
        with anystep_state(tr, tt=0.0, sign=-1.0):
            assert embed.tt == 0.0 and embed.sign == -1.0
            raise RuntimeError("boom")
    assert embed.tt is None and embed.sign is None
    set_anystep_state(tr, tt=0.5)
    assert embed.tt == 0.5
    set_anystep_state(tr)
    assert embed.tt is None
    with pytest.raises(ValueError, match=r"sign must be a float or a \[B\]=\(2,\) tensor"):
        adapter.forward(tr, x, torch.tensor([0.5, 0.5]), cond, sign=torch.ones(3))
    assert embed.sign is None


def test_stock_pipeline_call_conditioned_by_state(tiny):
    """A stock pipeline under anystep_state(tt=0, sign=+1) == Euler over adapter.forward(tt=0, sign=+1)."""
    adapter, comps = tiny("flux")
    _, tr, cond, x0 = _setup(tiny, "flux")
    _randomize(adapter.add_anystep(tr))
    sigmas = [1.0, 0.5]
    pipe = adapter.build_pipeline(comps, denoiser=tr)
    with torch.no_grad(), anystep_state(tr, tt=0.0, sign=1.0):
        out = pipe(**adapter.pipeline_prompt_kwargs(cond), **adapter.pipeline_latent_kwargs(comps, x0),
                   sigmas=sigmas, output_type="latent", return_dict=False)[0]
    got = adapter.latents_from_pipeline(out, *x0.shape[-2:])
    x = x0
    with torch.no_grad():
        for s, s_next in zip(sigmas, sigmas[1:] + [0.0]):
            x = x + (s_next - s) * adapter.forward(tr, x, torch.full((2,), s), cond, tt=0.0, sign=1.0)
        unconditioned = x0
        for s, s_next in zip(sigmas, sigmas[1:] + [0.0]):
            unconditioned = unconditioned + (s_next - s) * adapter.forward(tr, unconditioned, torch.full((2,), s), cond)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unconditioned, rtol=1e-3, atol=1e-3)


def test_state_dict_round_trip(tiny, tmp_path):
    adapter, tr, cond, x = _setup(tiny, "sd3")
    _randomize(adapter.add_anystep(tr))
    sd = anystep_state_dict(tr)
    assert set(sd) == {"sign_embed.weight", "tt_linear_1.weight", "tt_linear_1.bias", "tt_linear_2.weight",
                       "tt_linear_2.bias"}
    other = copy.deepcopy(tiny("sd3")[1].denoiser)
    adapter.add_anystep(other)
    load_anystep_state_dict(other, sd)
    args = (x, torch.tensor([0.4, 0.7]), cond)
    with torch.no_grad():
        want = adapter.forward(tr, *args, tt=0.1, sign=-1.0)
        assert torch.equal(adapter.forward(other, *args, tt=0.1, sign=-1.0), want)
    path = save_anystep(tr, tmp_path)
    assert path.name == ANYSTEP_WEIGHTS_NAME
    third = copy.deepcopy(tiny("sd3")[1].denoiser)
    adapter.add_anystep(third)
    load_anystep(third, tmp_path)
    with torch.no_grad():
        assert torch.equal(adapter.forward(third, *args, tt=0.1, sign=-1.0), want)
    with pytest.raises(KeyError, match="do not match"):
        load_anystep_state_dict(third, {"sign_embed.weight": sd["sign_embed.weight"]})
    with pytest.raises(ValueError, match="add_anystep"):
        anystep_state_dict(copy.deepcopy(tiny("sd3")[1].denoiser))


def test_deepcopy_keeps_hook_bound_to_its_own_embedding(tiny):
    """EMA teachers are deep copies: the copy's hook must read the copy's weights and state."""
    adapter, tr, cond, x = _setup(tiny, "flux")
    _randomize(adapter.add_anystep(tr))
    twin = copy.deepcopy(tr)
    with torch.no_grad():
        twin.anystep_embed.sign_embed.weight.mul_(3.0)
        sig = torch.tensor([0.5, 0.5])
        a = adapter.forward(tr, x, sig, cond, sign=-1.0)
        b = adapter.forward(twin, x, sig, cond, sign=-1.0)
    assert not torch.allclose(a, b)
    assert get_adapter("flux").hook_time_scale == 1000 and get_adapter("qwenimage").hook_time_scale == 1


@pytest.mark.parametrize("mode", ["few", "any", "mul"])
def test_stock_pipeline_follows_the_scheduler_target_times(tiny, mode):
    """anystep_state(scheduler=...) in a stock pipeline == fewstep's own UCGM loop with tt per step (the mode's), at
    2 steps with deterministic re-noising (s = 0); the three modes give three different samples."""
    from fewstep.sampling import twinflow_loop
    from fewstep.schedulers import TwinFlowScheduler

    adapter, comps = tiny("flux")
    _, tr, cond, x0 = _setup(tiny, "flux")
    _randomize(adapter.add_anystep(tr))

    def sched():
        return TwinFlowScheduler(num_train_timesteps=1000, shift=1.0, target_time=mode, stochastic_ratio=0.0)
    pipe = adapter.build_pipeline(comps, denoiser=tr, scheduler=sched())
    with torch.no_grad(), anystep_state(tr, sign=1.0, scheduler=pipe.scheduler):
        out = pipe(**adapter.pipeline_prompt_kwargs(cond), **adapter.pipeline_latent_kwargs(comps, x0),
                   num_inference_steps=2, output_type="latent", return_dict=False)[0]
    assert tr.anystep_embed.scheduler is None  # cleared after the block
    got = adapter.latents_from_pipeline(out, *x0.shape[-2:])
    with torch.no_grad():
        ref = twinflow_loop(lambda x, s, tt: adapter.forward(tr, x, s, cond, tt=tt, sign=1.0), x0, sched(), 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    _MODE_SAMPLES[mode] = got
    if len(_MODE_SAMPLES) == 3:
        a, b, c = _MODE_SAMPLES.values()
        assert not torch.allclose(a, b) and not torch.allclose(b, c) and not torch.allclose(a, c)


_MODE_SAMPLES = {}


def test_scheduler_and_tt_are_exclusive(tiny):
    from fewstep.schedulers import TwinFlowScheduler

    _, tr, _, _ = _setup(tiny, "flux")
    get_adapter("flux").add_anystep(tr)
    with pytest.raises(ValueError, match="either a scheduler or tt"):
        set_anystep_state(tr, tt=0.0, scheduler=TwinFlowScheduler())


def _twinflow(mode, steps=4):
    """A TwinFlowScheduler (no shift, deterministic) with its `steps`-step grid set."""
    from fewstep.schedulers import TwinFlowScheduler

    sched = TwinFlowScheduler(num_train_timesteps=1000, shift=1.0, target_time=mode, stochastic_ratio=0.0)
    sched.set_timesteps(steps)
    return sched


def test_scheduler_state_without_sign_feeds_the_current_step_times(tiny):
    """anystep_state(scheduler=...), no sign: a call gets t = sigma_i, tt = sigma_{i+1} ("any") of the current step."""
    adapter, tr, cond, x = _setup(tiny, "flux")
    _randomize(adapter.add_anystep(tr))
    sched = _twinflow("any")
    sched.step(torch.zeros_like(x), sched.timesteps[0], x)  # now at step 1
    assert sched.step_index == 1
    s1, s2 = float(sched.sigmas[1]), float(sched.sigmas[2])
    sigma = torch.full((2,), s1)
    with torch.no_grad():
        base = adapter.forward(tr, x, sigma, cond)
        want = adapter.forward(tr, x, sigma, cond, tt=s2)
        with anystep_state(tr, scheduler=sched):
            got = adapter.forward(tr, x, sigma, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, rtol=1e-3, atol=1e-3)


def test_scheduler_times_start_at_begin_index(tiny):
    """Before the first step (img2img/strength), t and tt are those of step begin_index, not of step 0."""
    adapter, tr, cond, x = _setup(tiny, "flux")
    embed = adapter.add_anystep(tr)
    _randomize(embed)
    sched = _twinflow("any")
    sched.set_begin_index(1)
    assert sched.step_index is None
    s1, s2 = float(sched.sigmas[1]), float(sched.sigmas[2])
    with anystep_state(tr, scheduler=sched):
        assert embed._scheduler_times() == (s1, s2)
    sigma = torch.full((2,), s1)
    with torch.no_grad():
        want = adapter.forward(tr, x, sigma, cond, tt=s2)
        with anystep_state(tr, scheduler=sched):
            got = adapter.forward(tr, x, sigma, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_scheduler_mul_mode_is_exactly_flow_matching(tiny, tiny_dirs):
    """bf16 model, "mul" (tt = sigma_i): t is the scheduler's exact sigma, not the bf16 timestep, so t - tt = 0."""
    adapter, _, cond, x = _setup(tiny, "flux")
    tr = adapter.load(tiny_dirs("flux"), dtype=torch.bfloat16, with_text=False, with_vae=False).denoiser
    _randomize(adapter.add_anystep(tr))
    x, cond = x.bfloat16(), {k: v.bfloat16() if v.is_floating_point() else v for k, v in cond.items()}
    sched = _twinflow("mul")
    i = next(i for i in range(len(sched.sigmas) - 1)  # a sigma the bf16 timestep (sigma * 1000) cannot hold
             if float((sched.sigmas[i] * 1000).bfloat16()) / 1000 != float(sched.sigmas[i].float()))
    sched.set_begin_index(i)
    sigma = torch.full((2,), float(sched.sigmas[i]))
    with torch.no_grad():
        no_tt = adapter.forward(tr, x, sigma, cond)
        with anystep_state(tr, scheduler=sched):
            got = adapter.forward(tr, x, sigma, cond)
        assert torch.equal(got, no_tt), (got.float() - no_tt.float()).abs().max()
        with anystep_state(tr, scheduler=_twinflow("few")):  # the term is live: tt = 0 moves the output
            assert not torch.equal(adapter.forward(tr, x, sigma, cond), no_tt)


def test_embedding_width_reads_the_lora_wrapped_linear(tiny):
    """A LoRA on time_embedding.linear_2 (peft wrapper): the width is still the real Linear's out_features."""
    from peft import LoraConfig

    from fewstep.models.anystep import embedding_width

    adapter, comps = tiny("sdxl")
    unet = copy.deepcopy(comps.denoiser)
    width = unet.config.block_out_channels[0] * 4  # TimestepEmbedding's width: 4 x the first block's channels
    assert width == 128 and embedding_width(unet) == width
    unet.add_adapter(LoraConfig(r=4, target_modules=["time_embedding.linear_2"]))
    assert not isinstance(unet.time_embedding.linear_2, torch.nn.Linear)  # peft's wrapper
    assert embedding_width(unet) == embedding_width(unet, "time_embedding") == width
    embed = adapter.add_anystep(unet)
    assert embed.sign_embed.weight.shape == (2, width) and embed.tt_linear_2.out_features == width
