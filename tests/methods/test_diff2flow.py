"""diff2flow bridge: an exact epsilon / v model of Gaussian data, bridged, gives the exact flow velocity."""
import numpy as np
import pytest
import torch

from fewstep.methods.diff2flow import (diff2flow_model, diffusion_output_to_flow, flow_to_diffusion_input,
                                       sigma_table, sigma_to_timestep, timestep_to_sigma)

MU_SHAPE = (2, 3, 3)
S = 0.5  # data std


def scaled_linear_alphas(T=1000):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas))


def model_abar(timestep, abar):
    """The analytic model's own abar at a continuous timestep: sigma interpolated linearly over the index table."""
    a, b = abar.sqrt().numpy(), (1 - abar).sqrt().numpy()
    sig = np.interp(timestep.double().numpy(), np.arange(len(a)), b / (a + b))
    return torch.from_numpy((1 - sig) ** 2 / ((1 - sig) ** 2 + sig**2))


def gaussian_models(mu, abar):
    """Exact epsilon- and v-predictions for data x ~ N(mu, S^2) under x_k = a x + b eps."""
    def coeffs(x, timestep):
        ab = model_abar(timestep, abar).reshape(-1, 1, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        r = x - a * mu
        var = a**2 * S**2 + b**2
        return a, b, b * r / var, mu + a * S**2 * r / var  # a, b, E[eps|x_k], E[x|x_k]

    def eps_model(x, timestep, cond):
        return coeffs(x, timestep)[2]

    def v_model(x, timestep, cond):
        a, b, eps, x0 = coeffs(x, timestep)
        return a * eps - b * x0

    return eps_model, v_model


def exact_flow_velocity(x, sigma, mu):
    """E[z - x | x_sigma] for x_sigma = sigma z + (1 - sigma) x, x ~ N(mu, S^2), z ~ N(0, 1)."""
    s = sigma.reshape(-1, 1, 1, 1)
    var = s**2 + (1 - s) ** 2 * S**2
    r = x - (1 - s) * mu
    return s * r / var - (mu + (1 - s) * S**2 * r / var)


def test_sigma_table_and_lookup():
    abar = scaled_linear_alphas()
    table = sigma_table(abar)
    assert table.dtype == torch.float64 and bool((table[1:] > table[:-1]).all())
    k = torch.tensor([0, 17, 500, 999])
    a, b = abar[k].sqrt(), (1 - abar[k]).sqrt()
    torch.testing.assert_close(table[k], b / (a + b))
    torch.testing.assert_close(sigma_to_timestep(table[k], abar), k.double())
    tau = torch.tensor([3.25, 123.5, 998.9], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_timestep(timestep_to_sigma(tau, abar), abar), tau)
    assert sigma_to_timestep(torch.tensor([0.0, 1.0]), abar).tolist() == [0.0, 999.0]  # clamped to the table
    with pytest.raises(ValueError, match="decreasing"):
        sigma_table(torch.linspace(0.1, 0.9, 10))


def test_input_scaling_maps_flow_state_to_diffusion_state():
    x, z = torch.randn(4, *MU_SHAPE, dtype=torch.float64), torch.randn(4, *MU_SHAPE, dtype=torch.float64)
    abar = scaled_linear_alphas()
    k = torch.tensor([5, 200, 600, 990])
    sigma = sigma_table(abar)[k].reshape(-1, 1, 1, 1)
    x_flow = sigma * z + (1 - sigma) * x
    a, b = abar[k].sqrt().reshape(-1, 1, 1, 1), (1 - abar[k]).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(flow_to_diffusion_input(x_flow, sigma.flatten()), a * x + b * z)
    # a perfect epsilon prediction (the true noise) converts to the true velocity z - x
    F = diffusion_output_to_flow(z, a * x + b * z, sigma.flatten(), "epsilon")
    torch.testing.assert_close(F, z - x)
    F = diffusion_output_to_flow(a * z - b * x, a * x + b * z, sigma.flatten(), "v_prediction")
    torch.testing.assert_close(F, z - x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_bridged_gaussian_model_gives_exact_flow_velocity(prediction_type):
    torch.manual_seed(0)
    abar = scaled_linear_alphas()
    mu = torch.randn(1, *MU_SHAPE, dtype=torch.float64)
    eps_model, v_model = gaussian_models(mu, abar)
    base = eps_model if prediction_type == "epsilon" else v_model
    seen = []
    flow = diff2flow_model(lambda x, ts, c: (seen.append(ts), base(x, ts, c))[1], abar, prediction_type)
    table = sigma_table(abar)
    # table nodes and points in between, inside the base model's range
    sigma = torch.cat([table[torch.tensor([0, 10, 400, 999])], torch.tensor([0.05, 0.33, 0.5, 0.77, 0.93])])
    B = sigma.numel()
    x = torch.randn(B, *MU_SHAPE, dtype=torch.float64) * 1.3
    F = flow(x, sigma, sigma * 0.5, None)
    torch.testing.assert_close(F, exact_flow_velocity(x, sigma, mu), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(seen[0][:4], torch.tensor([0.0, 10.0, 400.0, 999.0], dtype=torch.float64))
    # the sign of t and tt are ignored (a diffusion base has no fake trajectory)
    torch.testing.assert_close(flow(x, -sigma, -sigma, None), F)
    # sigma = 1 (pure noise) is beyond an epsilon base: the input keeps its exact scale (x_k = z), the base runs at its
    # last timestep and F is the flow identity, so x - 1 * F is the base's x0 estimate there (DDIM's first step)
    seen.clear()
    z = torch.randn(1, *MU_SHAPE, dtype=torch.float64)
    F1 = flow(z, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), None)
    assert torch.isfinite(F1).all() and float(seen[0]) == 999.0
    a, b = abar[-1].sqrt(), (1 - abar[-1]).sqrt()
    out = base(z, seen[0], None)
    x0_ddim = (z - b * out) / a if prediction_type == "epsilon" else a * z - b * out
    torch.testing.assert_close(z - F1, x0_ddim, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_below_the_base_range_the_velocity_reads_the_output_at_the_true_sigma(prediction_type):
    """Below lo (sigma(0) ~ 0.028) the base runs at its first timestep on the input scaled for the true sigma, and its
    output is converted with that sigma's coefficients: the noise the velocity implies, x + (1 - sigma) F, is the
    base's own estimate (eps_hat, or a v_hat + b x_k), as inside the range; with lo's coefficients it was off by ~5%."""
    abar = scaled_linear_alphas()
    lo = float(sigma_table(abar)[0])
    sigma = torch.tensor([0.0, 0.01, 0.02, lo], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, *MU_SHAPE, generator=g, dtype=torch.float64)
    out = torch.randn(4, *MU_SHAPE, generator=g, dtype=torch.float64)  # any base output
    F = diff2flow_model(lambda xk, ts, c: out, abar, prediction_type)(x, sigma, sigma, None)
    s = sigma.reshape(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        eps = out
    else:  # v = a eps - b x0 with x_k = a x0 + b eps  =>  eps = a v + b x_k
        a, b = (1 - s) / ((1 - s) ** 2 + s**2).sqrt(), s / ((1 - s) ** 2 + s**2).sqrt()
        eps = a * out + b * flow_to_diffusion_input(x, sigma)
    torch.testing.assert_close(x + (1 - s) * F, eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_above_the_base_range_a_one_step_sample_is_the_base_x0_estimate(prediction_type):
    """Between hi (~0.936 on SDXL) and 1 the base runs at its last timestep on x_k = s(sigma) x with s != 1, and
    x - sigma F is its x0 estimate there: the flow identity must use the flow state x, not the base's input x_k."""
    abar = scaled_linear_alphas()
    sigma = torch.tensor([0.95, 0.99], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, *MU_SHAPE, generator=g, dtype=torch.float64)
    out = torch.randn(2, *MU_SHAPE, generator=g, dtype=torch.float64)  # any base output
    seen = []
    F = diff2flow_model(lambda xk, ts, c: (seen.append(ts), out)[1], abar, prediction_type)(x, sigma, sigma, None)
    assert seen[0].tolist() == [999.0, 999.0]  # clamped to the last timestep
    # by hand: x_k = x / sqrt((1 - sigma)^2 + sigma^2), converted with the last timestep's a = sqrt(abar), b
    s = sigma.reshape(-1, 1, 1, 1)
    x_k = x / ((1 - s) ** 2 + s**2).sqrt()
    a, b = abar[-1].sqrt(), (1 - abar[-1]).sqrt()
    x0 = (x_k - b * out) / a if prediction_type == "epsilon" else a * x_k - b * out
    torch.testing.assert_close(x - s * F, x0, rtol=1e-12, atol=1e-12)


def test_repeated_alphas_cumprod_is_rejected():
    """A noise table with a repeated value is not strictly decreasing: two timesteps share a sigma and the timestep
    lookup would divide by zero, so the table must be rejected up front."""
    with pytest.raises(ValueError, match="strictly decreasing"):
        sigma_table(torch.tensor([1.0, 0.9, 0.9, 0.5], dtype=torch.float64))


def test_bridge_dtype_and_errors():
    abar = scaled_linear_alphas()
    eps_model, _ = gaussian_models(torch.zeros(1, *MU_SHAPE, dtype=torch.float64), abar)
    flow = diff2flow_model(lambda x, ts, c: eps_model(x.double(), ts, c).to(x.dtype), abar, "eps")
    x = torch.randn(2, *MU_SHAPE)
    F = flow(x, torch.tensor([0.3, 0.6]), torch.tensor([0.3, 0.6]), None)
    assert F.dtype == torch.float32
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        diff2flow_model(eps_model, abar, "sample")
