"""diff2flow: use an epsilon- or v-prediction diffusion model as a flow-matching model (e.g. a TwinFlow teacher).

Diffusion: x_k = a x + b eps with a = sqrt(abar_k), b = sqrt(1 - abar_k), a^2 + b^2 = 1 (k = timestep index).
Flow:      x_sigma = sigma z + (1 - sigma) x.
Both describe the same point when sigma = b / (a + b) and x_k = (a + b) x_sigma. Given sigma alone,
    s = a + b = 1 / sqrt((1 - sigma)^2 + sigma^2),   a = (1 - sigma) s,   b = sigma s,
so the input scaling and the output conversion are exact for any sigma; only the model's timestep (which index k has
that sigma) comes from the `alphas_cumprod` table, by linear interpolation (a continuous timestep).
Output conversion to the flow velocity F = eps_hat - x0_hat (noise minus data, as fewstep's flow models):
    epsilon:      x0_hat = (x_k - b eps_hat) / a
    v_prediction: x0_hat = a x_k - b v_hat,   eps_hat = a v_hat + b x_k
Time outside the base's range. The base model only knows sigma in [lo, hi] = [sigma(0), sigma(T-1)] (about
[0.028, 0.936] for SDXL's scaled-linear betas; an epsilon model cannot run at sigma = 1, where a = 0). fewstep's rule
(`bridge_velocity`), for the teacher and the student alike:
  * the input is scaled by the exact s(sigma) (at sigma = 1: x_k = z, unit variance, as diffusion samplers start);
  * the timestep uses sigma clamped to [lo, hi]; the output conversion sigma clamped to at most hi: x0_hat is the
    base's data estimate there (at sigma = 1 exactly DDIM's first-step x0 prediction from pure noise);
  * above hi the velocity is F = (x - x0_hat) / sigma, the flow identity at the true sigma (x = sigma z + (1-sigma) x0),
    so that x - sigma F = x0_hat: a one-step sample from pure noise is the base's x0 estimate; below lo F = eps - x0
    with the true sigma's coefficients, those x_k was scaled with (so x + (1 - sigma) F is the base's eps_hat).
Inside [lo, hi] all of this is the exact bridge. The student also gets the true t through its any-step embedding.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction"}


def _check_alphas(alphas_cumprod) -> torch.Tensor:
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"diff2flow: alphas_cumprod must be a 1-D table with >= 2 entries, got shape {list(a.shape)}")
    if not bool(((a > 0) & (a <= 1)).all()) or not bool((a[1:] < a[:-1]).all()):
        raise ValueError("diff2flow: alphas_cumprod must be strictly decreasing values in (0, 1]")
    return a


def sigma_table(alphas_cumprod) -> torch.Tensor:
    """Flow sigma of every diffusion timestep, sigma_k = sqrt(1 - abar_k) / (sqrt(abar_k) + sqrt(1 - abar_k)), fp64."""
    a = _check_alphas(alphas_cumprod)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    return sb / (sa + sb)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing), clamped to the table's ends."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def sigma_to_timestep(sigma: torch.Tensor, alphas_cumprod, table: torch.Tensor | None = None) -> torch.Tensor:
    """Continuous diffusion timestep (index units, in [0, T-1]) whose flow sigma is `sigma`, by table lookup.
    `table`: `sigma_table(alphas_cumprod)` already on sigma's device (a caller in a training loop keeps one there)."""
    table = sigma_table(alphas_cumprod).to(sigma.device) if table is None else table
    steps = torch.arange(table.numel(), dtype=torch.float64, device=sigma.device)
    return _interp(sigma.to(torch.float64), table, steps)


def timestep_to_sigma(timestep: torch.Tensor, alphas_cumprod) -> torch.Tensor:
    """Flow sigma at a (continuous) diffusion timestep: the sigma table interpolated linearly, fp64."""
    table = sigma_table(alphas_cumprod).to(timestep.device)
    steps = torch.arange(table.numel(), dtype=torch.float64, device=timestep.device)
    return _interp(timestep.to(torch.float64), steps, table)


def diffusion_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) = (sqrt(abar), sqrt(1 - abar)) of the diffusion state that equals the flow state at `sigma`."""
    s = torch.rsqrt((1 - sigma) ** 2 + sigma**2)
    return (1 - sigma) * s, sigma * s


def flow_to_diffusion_input(x_flow: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Diffusion-model input x_k = (a + b) x_sigma for the per-sample flow state at `sigma` [B]."""
    a, b = diffusion_coefficients(sigma.to(torch.float64))
    return x_flow * (a + b).reshape(-1, *([1] * (x_flow.dim() - 1))).to(x_flow.dtype)


def _prediction_kind(prediction_type: str) -> str:
    kind = PREDICTION_TYPES.get(prediction_type)
    if kind is None:
        raise ValueError(f"diff2flow: prediction_type={prediction_type!r}, expected one of {sorted(PREDICTION_TYPES)}")
    return kind


def _eps_x0(out: torch.Tensor, x_diff: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kind: str):
    """(eps_hat, x0_hat) from the base's output at diffusion input x_diff = a x0 + b eps (module docstring)."""
    if kind == "epsilon":
        return out, (x_diff - b * out) / a
    return a * out + b * x_diff, a * x_diff - b * out


def diffusion_output_to_flow(output: torch.Tensor, x_diff: torch.Tensor, sigma: torch.Tensor,
                             prediction_type: str) -> torch.Tensor:
    """Flow velocity F = eps_hat - x0_hat from an epsilon / v prediction at diffusion input x_diff: the exact
    bridge inside the base's range, the reference the tests hold `bridge_velocity` to.

    Computed in fp32 (fp64 for fp64 inputs); `sigma` [B] is the flow sigma of each row."""
    kind = _prediction_kind(prediction_type)
    cd = torch.promote_types(torch.promote_types(output.dtype, x_diff.dtype), torch.float32)
    a, b = (c.to(cd).reshape(-1, *([1] * (x_diff.dim() - 1))) for c in diffusion_coefficients(sigma.to(torch.float64)))
    eps, x0 = _eps_x0(output.to(cd), x_diff.to(cd), a, b, kind)
    return eps - x0


def sigma_range(alphas_cumprod) -> tuple[float, float]:
    """(lo, hi): the flow sigmas of the base schedule's first and last timestep."""
    table = sigma_table(alphas_cumprod)
    return float(table[0]), float(table[-1])


def bridge_timestep(sigma: torch.Tensor, alphas_cumprod, table: torch.Tensor | None = None) -> torch.Tensor:
    """The base model's (continuous) timestep for flow sigma [B]: that of sigma clamped to the base's range, fp64."""
    return sigma_to_timestep(sigma.abs(), alphas_cumprod, table)


def bridge_velocity(output: torch.Tensor, x_flow: torch.Tensor, sigma: torch.Tensor, alphas_cumprod,
                    prediction_type: str) -> torch.Tensor:
    """Flow velocity F from the base's epsilon / v `output` for the flow state x_flow at sigma [B] (module docstring).

    The base was called on `flow_to_diffusion_input(x_flow, sigma)` at `bridge_timestep(sigma)`. Computed in fp32
    (fp64 for fp64 inputs); returned in x_flow's dtype."""
    kind = _prediction_kind(prediction_type)
    lo, hi = sigma_range(alphas_cumprod)
    cd = torch.promote_types(torch.promote_types(output.dtype, x_flow.dtype), torch.float32)
    sig = sigma.detach().abs().to(device=x_flow.device, dtype=torch.float64)
    view = (-1, *([1] * (x_flow.dim() - 1)))
    x_diff = flow_to_diffusion_input(x_flow.to(cd), sig)
    a, b = (c.to(cd).reshape(view) for c in diffusion_coefficients(sig.clamp(max=hi)))  # below lo: x_diff's own
    eps, x0 = _eps_x0(output.to(cd), x_diff, a, b, kind)
    above = (sig > hi).reshape(view)
    F = torch.where(above, (x_flow.to(cd) - x0) / sig.to(cd).reshape(view).clamp_min(hi), eps - x0)
    return F.to(x_flow.dtype)


def diff2flow_model(diffusion_model, alphas_cumprod, prediction_type: str):
    """(A reference form: training and sampling call `bridge_velocity` through the SDXL adapter and the scheduler.)
    Wrap `diffusion_model(x_k, timestep [B] float, cond) -> eps or v` as a flow model `model(x, t, tt, cond) -> F`.

    sigma = |t|; input, timestep and output per `bridge_velocity` (exact inside the base's range). `tt` and the sign of
    t are ignored: a diffusion base is an instantaneous (tt = t) model with no fake trajectory, so as a teacher it acts
    as flow matching (an RCGM rollout with it is an Euler integration).
    """
    _prediction_kind(prediction_type)  # checked before any call
    abar = _check_alphas(alphas_cumprod)

    def model(x, t, tt, cond):
        sigma = t.detach().abs().to(device=x.device, dtype=torch.float64)
        timestep = bridge_timestep(sigma, abar).to(torch.promote_types(t.dtype, torch.float32))
        out = diffusion_model(flow_to_diffusion_input(x, sigma), timestep, cond)
        return bridge_velocity(out, x, sigma, abar, prediction_type)

    return model
