import math

import pytest
import torch

from fewstep.methods.flow_matching import (flow_matching_loss, noisy_latents, resolution_shift, sample_sigmas,
                                           schedule_shift, shift_sigmas)


def test_shift_matches_flux_time_shift():
    sigma = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    mu = 0.8
    flux = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))  # diffusers' time_shift(mu, 1.0, sigma)
    assert torch.allclose(shift_sigmas(sigma, math.exp(mu)), flux)
    assert resolution_shift(256) == math.exp(0.5) and abs(resolution_shift(4096) - math.exp(1.15)) < 1e-12



def test_schedule_shift_is_the_static_one_or_flux_rule_on_the_latent_size():
    assert schedule_shift(64, 64, 3.0, auto=False) == 3.0
    assert schedule_shift(64, 64, 3.0, auto=True) == resolution_shift(1024)  # 1024 tokens of 2x2 latent patches
    assert schedule_shift(128, 128, 1.0, auto=True) == resolution_shift(4096) != resolution_shift(1024)


def test_sampled_sigmas_in_range_and_distribution():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, generator=g)
    assert (s > 0).all() and (s < 1).all() and abs(s.median().item() - 0.5) < 0.02
    u = sample_sigmas(20000, uniform=True, generator=g)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - (1 / 12) ** 0.5) < 0.01
    shifted = sample_sigmas(20000, uniform=True, shift=3.0, generator=g)
    assert shifted.mean() > u.mean() + 0.1  # a shift > 1 moves mass toward noise


def test_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])

    def oracle(x, s, cond):  # recovers noise - x0 from x_sigma knowing x0
        return (x - (1 - s.view(-1, 1, 1, 1)) * x0) / s.view(-1, 1, 1, 1) - x0

    loss, _ = flow_matching_loss(oracle, x0, sigma, None, noise=noise)
    assert loss.item() < 1e-10
    xs = noisy_latents(x0, noise, sigma)
    assert torch.allclose(xs[1], 0.5 * x0[1] + 0.5 * noise[1])
    loss2, _ = flow_matching_loss(lambda x, s, c: torch.zeros_like(x), x0, sigma, None, noise=noise)
    assert torch.allclose(loss2, ((noise - x0) ** 2).mean())


def test_logit_normal_sigmas_follow_the_given_mean_and_std():
    """logit(sigma) ~ N(logit_mean, logit_std): sample mean/std within ~5 standard errors of the requested values."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    for mean, std in ((1.0, 0.5), (-0.7, 1.5)):  # the second case tells mean from mean**2 (1.0**2 == 1.0)
        z = torch.logit(sample_sigmas(n, logit_mean=mean, logit_std=std, generator=g).double())
        # standard errors: std/sqrt(n) for the mean (<= 0.011), ~std/sqrt(2n) for the std (<= 0.0075)
        assert abs(z.mean().item() - mean) < 5 * std / n ** 0.5
        assert abs(z.std().item() - std) < 5 * std / (2 * n) ** 0.5


@pytest.mark.parametrize("exact", [True, False])
def test_loss_is_fp32_for_a_bf16_model(exact):
    """bf16 prediction and latents: the loss is fp32 and equals the fp64 MSE against noise - x0, also where that
    difference is not a bf16 value (random latents: a target rounded to bf16 was off by up to 0.4%)."""
    g = torch.Generator().manual_seed(0)
    if exact:  # multiples of 1/8 in [-2, 2]: exact in bf16, and so is noise - x0
        x0 = (torch.randint(-16, 17, (2, 4, 8, 8), generator=g) / 8).bfloat16()
        noise = (torch.randint(-16, 17, (2, 4, 8, 8), generator=g) / 8).bfloat16()
    else:
        x0, noise = (torch.randn(2, 4, 8, 8, generator=g).bfloat16() for _ in range(2))
    pred = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    loss, out = flow_matching_loss(lambda x, s, c: pred, x0, torch.tensor([0.3, 0.7]), None, noise=noise)
    assert loss.dtype == torch.float32 and out is pred
    want = ((pred.double() - (noise.double() - x0.double())) ** 2).mean()
    assert abs(loss.double().item() - want.item()) <= 1e-6 * want.item()
