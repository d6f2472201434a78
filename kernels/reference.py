"""Pure-PyTorch references for the fused kernels (the single source of truth for their maths).

Tests, the benchmark and the training methods import these; the Triton kernels in `ema.py` and `rcgm.py` must match
them. They cover the EMA update and the RCGM sub-step, target and loss of TwinFlow, plus its CFG-enhanced target
(no kernel: training builds it before the teacher rollout, which needs it). Conventions:

- per-sample times `t`, `tt` are [B] float tensors (signed); tensors `F`, `acc`, `target`, ... are [B, ...] with any
  trailing shape; `bcast(s)` views a [B] tensor as [B, 1, 1, ...] against them.
- all arithmetic is in float32 (float64 when an input is float64); results that are new tensors (`T`, the enhanced
  target, the loss) are returned in that compute dtype, in-place results keep their tensor's dtype.
"""
from __future__ import annotations

import numbers

import torch

__all__ = [
    "ema_update_reference_",
    "rcgm_substep_reference_",
    "enhance_target_reference",
    "rcgm_coefficients_reference",
    "rcgm_target_reference",
    "barron_loss_reference",
    "rcgm_target_loss_reference",
]


# ----------------------------------------------------------------------------------------------------------------------
# helpers shared with the kernels' launchers


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (bf16/fp16 inputs are upcast)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a [B] tensor as [B, 1, ..., 1] so it broadcasts over the trailing dims of `like`."""
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def per_sample(v, batch: int, name: str, *, device, dtype=torch.float32) -> torch.Tensor:
    """A number, a 0-d tensor or a [B] tensor as a [B] tensor of `dtype` on `device`; anything else is an error."""
    if isinstance(v, numbers.Number):
        return torch.full((batch,), float(v), dtype=dtype, device=device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a number or a tensor of shape [{batch}], got {type(v).__name__}")
    if v.dim() == 0:
        return v.to(device=device, dtype=dtype).expand(batch).contiguous()
    if v.shape != (batch,):
        raise ValueError(f"{name}: expected shape [{batch}] (one value per sample), got {list(v.shape)}")
    return v.to(device=device, dtype=dtype).contiguous()


def _as_list(x, name: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    x = list(x)
    if not all(isinstance(v, torch.Tensor) for v in x):
        raise TypeError(f"{name}: expected a tensor or a sequence of tensors")
    return x


def check_rcgm_scalars(delta_t, clamp, barron_c) -> None:
    """delta_t > 0, clamp >= 0 (inf disables it), barron_c > 0; anything else is an error naming the value."""
    for name, v, ok in (("delta_t", delta_t, "> 0"), ("clamp", clamp, ">= 0"), ("barron_c", barron_c, "> 0")):
        if not isinstance(v, numbers.Real) or not (v > 0 or (ok == ">= 0" and v == 0)):
            raise ValueError(f"rcgm: {name} must be a number {ok}, got {v!r}")


def check_ema_args(ema, params, decay) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Validate EMA arguments; returns (ema list, param list, decay as float)."""
    ema, params = _as_list(ema, "ema"), _as_list(params, "params")
    if len(ema) != len(params):
        raise ValueError(f"ema_update_: got {len(ema)} ema tensors but {len(params)} params")
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    for i, (e, p) in enumerate(zip(ema, params)):
        if e.dtype != torch.float32:
            raise TypeError(f"ema_update_: ema[{i}] must be float32 (the EMA is an fp32 master copy), got {e.dtype}")
        if not p.is_floating_point():
            raise TypeError(f"ema_update_: params[{i}] must be floating point, got {p.dtype}")
        if e.numel() != p.numel():
            raise ValueError(f"ema_update_: ema[{i}] has {e.numel()} elements but params[{i}] has {p.numel()}")
        if e.device != p.device:
            raise ValueError(f"ema_update_: ema[{i}] is on {e.device} but params[{i}] is on {p.device}")
    return ema, params, decay


# ----------------------------------------------------------------------------------------------------------------------
# references


@torch.no_grad()
def ema_update_reference_(ema, params, decay) -> None:
    """In place `ema <- decay*ema + (1-decay)*param` (torch.lerp semantics) over a tensor or a list of tensors.

    `ema` is float32; `params` are float32 or bf16 (upcast first). decay = 0 copies the params exactly.
    """
    ema, params, decay = check_ema_args(ema, params, decay)
    if not ema:
        return
    src = [p.detach().reshape(e.shape).to(e.dtype) for e, p in zip(ema, params)]
    torch._foreach_lerp_(ema, src, 1.0 - decay)


@torch.no_grad()
def rcgm_substep_reference_(x, acc, F, t_cur, t_next) -> None:
    """One RCGM teacher sub-step, in place: with h = bcast(t_cur - t_next), `x -= h*F; acc += h*F` (fp32 maths).

    `t_cur`, `t_next` are [B] tensors or numbers; x/acc keep their dtypes (fp32, or the dtype of F).
    """
    B = F.shape[0]
    h = per_sample(t_cur, B, "t_cur", device=F.device, dtype=torch.float64) - per_sample(
        t_next, B, "t_next", device=F.device, dtype=torch.float64)
    cd = compute_dtype(x, acc, F)
    hF = bcast(h.to(cd), F) * F.to(cd)
    x.copy_(x.to(cd) - hF)
    acc.copy_(acc.to(cd) + hF)


def enhance_target_reference(target, cond=None, uncond=None, ratio=0.0, mask=None) -> torch.Tensor:
    """CFG-enhanced target `E = target + ratio*bcast(mask)*(cond - uncond)` in the compute dtype (detached).

    `mask` is a [B] bool/float tensor (default all ones); without cond/uncond (or ratio 0) E is the target itself.
    """
    cd = compute_dtype(target, cond, uncond)
    E = target.detach().to(cd)
    if (cond is None) != (uncond is None):
        raise ValueError("enhance_target: give both cond and uncond, or neither")
    if cond is None:
        return E  # may share storage with `target` when it is already in the compute dtype
    B = target.shape[0]
    m = torch.ones(B, dtype=cd, device=target.device) if mask is None else per_sample(
        mask.to(cd) if isinstance(mask, torch.Tensor) else mask, B, "enhance_mask", device=target.device, dtype=cd)
    er = bcast(float(ratio) * m, target)
    return E + er * (cond.detach().to(cd) - uncond.detach().to(cd))


def rcgm_coefficients_reference(t, tt, delta_t) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample RCGM coefficients: d = t - tt; `(d/delta_t, 1/delta_t)` where d >= delta_t, else `(1, 0)`.

    The second branch has no teacher rollout (acc = 0) and a zero acc coefficient, so t == tt never gives 0*inf.
    """
    if not float(delta_t) > 0.0:
        raise ValueError(f"rcgm: delta_t must be > 0, got {delta_t}")
    cd = compute_dtype(t, tt)
    d = t.to(cd) - tt.to(cd)
    big = d >= delta_t
    cof_l = torch.where(big, d / delta_t, torch.ones_like(d))
    cof_r = torch.where(big, torch.full_like(d, 1.0 / delta_t), torch.zeros_like(d))
    return cof_l, cof_r


@torch.no_grad()
def rcgm_target_reference(F, acc, E, t, tt, *, delta_t, clamp, rcgm_mask=None) -> torch.Tensor:
    """RCGM target `T = F - clamp(cof_l*F - cof_r*acc - E, -clamp, clamp)`, detached, in the compute dtype.

    Rows where `rcgm_mask` is False (adversarial rows) get `T = E` exactly. `acc=None` means no rollout (zeros).
    """
    check_rcgm_scalars(delta_t, clamp, 1.0)
    B = F.shape[0]
    cd = compute_dtype(F, acc, E, *(v for v in (t, tt) if isinstance(v, torch.Tensor)))
    t, tt = (per_sample(v, B, name, device=F.device, dtype=cd) for v, name in ((t, "t"), (tt, "tt")))
    cof_l, cof_r = rcgm_coefficients_reference(t, tt, delta_t)
    Fc, E = F.detach().to(cd), E.to(cd)
    R = bcast(cof_l, F) * Fc - E
    if acc is not None:
        # the acc term is exactly 0 where cof_r == 0 (guards against a non-finite acc on d < delta_t rows)
        R = R - torch.where(bcast(cof_r != 0, F), bcast(cof_r, F) * acc.detach().to(cd), 0.0)
    T = Fc - R.clamp(-clamp, clamp)
    if rcgm_mask is not None:
        keep = per_sample(rcgm_mask, B, "rcgm_mask", device=F.device, dtype=torch.bool)
        T = torch.where(bcast(keep, F), T, E)
    return T


BARRON_EPS = 1e-8  # the reference adds it to c^2 in the weight: (m / (c^2 + 1e-8) + 1)^-1/2


def barron_loss_reference(F, T, sample_weight=None, c=1e-3) -> torch.Tensor:
    """Per-sample Barron-reweighted L2 (alpha = 1): `m = mean((F-T)^2)`, `w = sg((m/(c^2 + BARRON_EPS)+1)^-1/2)`,
    `loss = sw*w*m/c`, as the reference's `barron_reweighting_loss`.

    Differentiable w.r.t. F through autograd (T, w and sample_weight are constants). Returns [B] in the compute dtype.
    """
    check_rcgm_scalars(1.0, 0.0, c)
    cd = compute_dtype(F, T)
    B = F.shape[0]
    m = (F.to(cd) - T.detach().to(cd)).square().reshape(B, -1).mean(1)
    w = (m.detach() / (c * c + BARRON_EPS) + 1.0).rsqrt()
    sw = 1.0 if sample_weight is None else per_sample(
        sample_weight.detach() if isinstance(sample_weight, torch.Tensor) else sample_weight, B, "sample_weight",
        device=F.device, dtype=cd)
    return sw * w * m / c


def rcgm_target_loss_reference(F_student, acc, target, t, tt, *, delta_t, clamp, rcgm_mask=None, sample_weight=None,
                               barron_c=1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """RCGM target T -> Barron loss. Returns `(loss [B], T)`; T detached, in the compute dtype.

    `target` is the (already CFG-enhanced, `enhance_target_reference`) target E. The compute dtype is float64 if any
    tensor input (F, acc, target, t, tt) is float64, else float32.
    """
    cd = compute_dtype(F_student, acc, target, *(v for v in (t, tt) if isinstance(v, torch.Tensor)))
    E = target.detach().to(cd)
    T = rcgm_target_reference(F_student, acc, E, t, tt, delta_t=delta_t, clamp=clamp, rcgm_mask=rcgm_mask)
    return barron_loss_reference(F_student, T, sample_weight, barron_c), T
