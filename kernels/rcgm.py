"""RCGM kernels of TwinFlow: the teacher sub-step of the rollout, and the fused RCGM target + Barron loss.

All kernels use the same grid: program `pid` handles block `pid % nblk` of sample row `pid // nblk` (a row has n
elements, nblk = cdiv(n, BLOCK)), so per-sample scalars are loaded once per program and a program never straddles
two rows. Maths in fp32 (fp64 when F is fp64); see `reference.py` for the definitions these match.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import block_for, round_bf16, tl_dtype, to_out
from .reference import BARRON_EPS, check_rcgm_scalars, compute_dtype, per_sample, rcgm_coefficients_reference

DEFAULT_BLOCK = 4096
DEFAULT_WARPS = 8


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output (tests swap in a NaN fill to show each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _row_block(n, nblk, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // nblk
    offs = (pid % nblk).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # offsets inside the row
    return pid, row, row.to(tl.int64) * n + offs, offs


# ----------------------------------------------------------------------------------------------------------------------
# sub-step: x -= h*F; acc += h*F


@triton.jit
def _substep_kernel(x_ptr, acc_ptr, f_ptr, h_ptr, n, nblk, BLOCK: tl.constexpr, CD: tl.constexpr,
                    X_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, RTNE_BF16: tl.constexpr):
    _, row, idx, offs = _row_block(n, nblk, BLOCK)
    mask = offs < n
    hf = tl.load(h_ptr + row) * tl.load(f_ptr + idx, mask=mask).to(CD)
    x = tl.load(x_ptr + idx, mask=mask).to(CD) - hf
    a = tl.load(acc_ptr + idx, mask=mask).to(CD) + hf
    tl.store(x_ptr + idx, to_out(x, X_DTYPE, RTNE_BF16), mask=mask)
    tl.store(acc_ptr + idx, to_out(a, ACC_DTYPE, RTNE_BF16), mask=mask)


def _check_like(name: str, x: torch.Tensor | None, F: torch.Tensor, op: str) -> None:
    if x is None:
        return
    if x.shape != F.shape:
        raise ValueError(f"{op}: {name} has shape {list(x.shape)}, expected F's shape {list(F.shape)}")
    if x.device != F.device:
        raise ValueError(f"{op}: {name} is on {x.device}, expected {F.device} like F")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")


@torch.no_grad()
def rcgm_substep_triton_(x, acc, F, t_cur, t_next, *, BLOCK: int = DEFAULT_BLOCK,
                         num_warps: int = DEFAULT_WARPS) -> None:
    """Triton `x -= h*F; acc += h*F` in place, h = bcast(t_cur - t_next). x and acc must be contiguous."""
    op = "rcgm_substep_"
    for name, v in (("x", x), ("acc", acc)):
        _check_like(name, v, F, op)
        if not v.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is updated in place), got strides {v.stride()}")
    B = F.shape[0]
    cd = compute_dtype(x, acc, F)
    h = (per_sample(t_cur, B, "t_cur", device=F.device, dtype=torch.float64)
         - per_sample(t_next, B, "t_next", device=F.device, dtype=torch.float64)).to(cd)
    n = F[0].numel() if B else 0
    if n == 0:
        return
    blk = block_for(n, BLOCK)
    nblk = triton.cdiv(n, blk)
    _substep_kernel[(B * nblk,)](x, acc, F.contiguous(), h, n, nblk, BLOCK=blk, CD=tl_dtype(cd),
                                 X_DTYPE=tl_dtype(x.dtype), ACC_DTYPE=tl_dtype(acc.dtype), RTNE_BF16=round_bf16(),
                                 num_warps=num_warps)


# ----------------------------------------------------------------------------------------------------------------------
# fused RCGM target + per-row sum of squares (forward) and the Barron-loss gradient (backward)


@triton.jit
def _target_fwd_kernel(f_ptr, acc_ptr, tgt_ptr, t_ptr, partial_ptr, cofl_ptr, cofr_ptr, keep_ptr, acc_len_ptr, clamp,
                       n, nblk, BLOCK: tl.constexpr, CD: tl.constexpr, HAS_ACC: tl.constexpr):
    pid, row, idx, offs = _row_block(n, nblk, BLOCK)
    mask = offs < n
    keep = tl.load(keep_ptr + row) != 0  # False: adversarial row, T = E
    f = tl.load(f_ptr + idx, mask=mask, other=0.0).to(CD)
    e = tl.load(tgt_ptr + idx, mask=mask, other=0.0).to(CD)  # the (already CFG-enhanced) target E
    r = tl.load(cofl_ptr + row) * f - e
    if HAS_ACC:  # acc_len is n, or 0 on rows that never read acc: cof_r == 0 (t - tt < delta_t) or adversarial
        a = tl.load(acc_ptr + idx, mask=offs < tl.load(acc_len_ptr + row), other=0.0).to(CD)
        r = r - tl.load(cofr_ptr + row) * a
    # NaN stays NaN, as in torch's clamp (Triton's default min/max return the other operand): a NaN teacher rollout
    # must make the loss non-finite and the step skipped, not become the target F -/+ clamp
    r = tl.minimum(tl.maximum(r, -clamp, propagate_nan=tl.PropagateNan.ALL), clamp,
                   propagate_nan=tl.PropagateNan.ALL)
    t = tl.where(keep, f - r, e)
    tl.store(t_ptr + idx, t, mask=mask)
    d = tl.where(mask, f - t, 0.0)
    tl.store(partial_ptr + pid, tl.sum(d * d, axis=0))


@triton.jit
def _target_bwd_kernel(f_ptr, t_ptr, scale_ptr, df_ptr, n, nblk, BLOCK: tl.constexpr, CD: tl.constexpr,
                       DF_DTYPE: tl.constexpr, RTNE_BF16: tl.constexpr):
    _, row, idx, offs = _row_block(n, nblk, BLOCK)
    mask = offs < n
    f = tl.load(f_ptr + idx, mask=mask).to(CD)
    t = tl.load(t_ptr + idx, mask=mask)
    tl.store(df_ptr + idx, to_out(tl.load(scale_ptr + row) * (f - t), DF_DTYPE, RTNE_BF16), mask=mask)


class _RcgmTargetLoss(torch.autograd.Function):
    """loss_i = sw_i * w_i * m_i / c with m_i = mean_j (F_ij - T_ij)^2; gradient w.r.t. F only (T, w constants)."""

    @staticmethod
    def forward(ctx, F, acc, target, cof_l, cof_r, keep, sw, clamp, c, BLOCK, num_warps):
        B, n = F.shape[0], F[0].numel()
        acc_len = torch.where((keep != 0) & (cof_r != 0), n, 0).to(torch.int64)
        cd = cof_l.dtype
        blk = block_for(n, BLOCK)
        nblk = triton.cdiv(n, blk)
        T = _empty(F.shape, cd, F.device)
        partial = _empty((B, nblk), cd, F.device)
        _target_fwd_kernel[(B * nblk,)](
            F, acc if acc is not None else F, target, T, partial, cof_l, cof_r, keep, acc_len, clamp, n, nblk,
            BLOCK=blk, CD=tl_dtype(cd), HAS_ACC=acc is not None, num_warps=num_warps)
        # tiny [B] epilogue: Barron weight (detached) and the loss
        m = partial.sum(1) / n
        w = (m / (c * c + BARRON_EPS) + 1.0).rsqrt()
        loss = sw * w * m / c
        ctx.save_for_backward(F, T, sw * w * (2.0 / (c * n)))
        ctx.launch = (n, blk, nblk, num_warps)
        ctx.mark_non_differentiable(T)
        return loss, T

    @staticmethod
    def backward(ctx, grad_loss, grad_T):
        F, T, coef = ctx.saved_tensors
        n, blk, nblk, num_warps = ctx.launch
        dF = _empty(F.shape, F.dtype, F.device)
        scale = (grad_loss.to(coef.dtype) * coef).contiguous()
        _target_bwd_kernel[(F.shape[0] * nblk,)](F, T, scale, dF, n, nblk, BLOCK=blk, CD=tl_dtype(coef.dtype),
                                                 DF_DTYPE=tl_dtype(F.dtype), RTNE_BF16=round_bf16(),
                                                 num_warps=num_warps)
        return (dF,) + (None,) * 10  # one gradient per forward input: F only


def rcgm_target_loss_triton(F_student, acc, target, t, tt, *, delta_t, clamp, rcgm_mask=None, sample_weight=None,
                            barron_c=1e-3, BLOCK: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_WARPS):
    """Fused `rcgm_target_loss_reference`: returns (loss [B], T); T detached, fp32 (fp64 if any input is fp64).

    `target` is the (already CFG-enhanced) target E. Forward reads F, target (+acc) once and writes T; backward reads
    F, T and writes dF. Gradient only w.r.t. F_student; sample_weight, the target and the times are constants.
    """
    op = "rcgm_target_loss"
    check_rcgm_scalars(delta_t, clamp, barron_c)
    for name, v in (("acc", acc), ("target", target)):
        _check_like(name, v, F_student, op)
    if F_student.dim() < 1 or F_student.numel() == 0:
        raise ValueError(f"{op}: F_student must be [B, ...] with at least one element per sample, "
                         f"got shape {list(F_student.shape)}")
    B, dev = F_student.shape[0], F_student.device
    cd = compute_dtype(F_student, acc, target, *(v for v in (t, tt) if isinstance(v, torch.Tensor)))
    t, tt = (per_sample(v, B, name, device=dev, dtype=cd) for v, name in ((t, "t"), (tt, "tt")))
    cof_l, cof_r = rcgm_coefficients_reference(t, tt, delta_t)
    ones = torch.ones(B, dtype=cd, device=dev)
    keep = ones.to(torch.int8) if rcgm_mask is None else per_sample(rcgm_mask, B, "rcgm_mask", device=dev,
                                                                     dtype=torch.bool).to(torch.int8)
    sw = ones if sample_weight is None else per_sample(
        sample_weight.detach() if isinstance(sample_weight, torch.Tensor) else sample_weight, B, "sample_weight",
        device=dev, dtype=cd)
    cont = [v.detach().contiguous() if v is not None else None for v in (acc, target)]
    return _RcgmTargetLoss.apply(F_student.contiguous(), *cont, cof_l.contiguous(), cof_r.contiguous(),
                                 keep.contiguous(), sw, float(clamp), float(barron_c), BLOCK, num_warps)
