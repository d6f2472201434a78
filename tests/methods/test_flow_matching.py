import math

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
