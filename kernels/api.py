"""The public dispatchers of fewstep.kernels (re-exported by its `__init__`): each runs the Triton kernel or the torch
reference, per `backend` (see the package docstring)."""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend, use_triton  # noqa: F401  (resolve_backend: re-exported)
from .ema import ema_update_triton_
from .rcgm import rcgm_substep_triton_, rcgm_target_loss_triton
from .reference import ema_update_reference_, rcgm_substep_reference_, rcgm_target_loss_reference


def ema_update_(ema, params, decay, *, backend: str = "auto") -> None:
    """In place `ema <- decay*ema + (1-decay)*param` over a tensor (e.g. a flat ZeRO partition) or a list of tensors.

    ema is fp32; params fp32/bf16/fp16 (upcast). decay = 0 copies the params exactly; decay = 1 leaves ema unchanged.
    """
    ts = [ema] if isinstance(ema, torch.Tensor) else list(ema)
    ps = [params] if isinstance(params, torch.Tensor) else list(params)
    if use_triton(backend, *ts, *ps, op="ema_update_"):
        ema_update_triton_(ts, ps, decay)
    else:
        ema_update_reference_(ts, ps, decay)


def rcgm_substep_(x, acc, F, t_cur, t_next, *, backend: str = "auto") -> None:
    """One RCGM teacher sub-step in place: h = t_cur - t_next per sample; `x -= h*F; acc += h*F` (fp32 maths).

    x, acc, F: [B, ...] (F may be bf16, x/acc fp32 or F's dtype); t_cur, t_next: [B] tensors or numbers.
    """
    if use_triton(backend, x, acc, F, op="rcgm_substep_"):
        rcgm_substep_triton_(x, acc, F, t_cur, t_next)
    else:
        rcgm_substep_reference_(x, acc, F, t_cur, t_next)


def rcgm_target_loss(F_student, acc, target, t, tt, *, delta_t, clamp, rcgm_mask=None, sample_weight=None,
                     barron_c=1e-3, backend: str = "auto"):
    """RCGM target and per-sample Barron-reweighted L2 loss of TwinFlow. Returns `(loss [B], T)`.

    `target` is the (already CFG-enhanced) target E; per sample d = t - tt, (cof_l, cof_r) = (d/delta_t, 1/delta_t)
    if d >= delta_t else (1, 0); T = F - clamp(cof_l*F - cof_r*acc - target, +-clamp), and T = target on rows where
    rcgm_mask is False. m = mean((F-T)^2), w = sg((m/c^2+1)^-1/2), loss = sample_weight*w*m/c with c = barron_c.
    T is detached and fp32 (fp64 for fp64 inputs); the loss is differentiable w.r.t. F_student only.
    """
    kw = dict(delta_t=delta_t, clamp=clamp, rcgm_mask=rcgm_mask, sample_weight=sample_weight, barron_c=barron_c)
    if use_triton(backend, F_student, acc, target, op="rcgm_target_loss"):
        return rcgm_target_loss_triton(F_student, acc, target, t, tt, **kw)
    return rcgm_target_loss_reference(F_student, acc, target, t, tt, **kw)
