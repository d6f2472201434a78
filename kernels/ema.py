"""Multi-tensor EMA update `ema <- lerp(ema, param, 1 - decay)` in one Triton launch per parameter dtype.

A list of tensors of different sizes (LoRA adapters, the model's parameters) is flattened into a work table: program i
updates block `blk_idx[i]` of tensor `blk_tensor[i]`, whose addresses come from int64 pointer tables. One flat buffer
(ZeRO's fp32 partition, or any single tensor) skips the tables. The arithmetic is torch.lerp's, so decay = 0 copies
the parameters exactly. The EMA is fp32; parameters may be fp32/bf16/fp16 and are upcast in the kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import block_for, tl_dtype
from .reference import check_ema_args

DEFAULT_BLOCK = 4096
DEFAULT_WARPS = 8


@triton.jit
def _lerp(e, p, w):
    # torch.lerp: start + w*(end-start) for w < 0.5, else end - (end-start)*(1-w) (exact at w = 0 and w = 1)
    d = p - e
    return tl.where(w < 0.5, e + w * d, p - d * (1.0 - w))


@triton.jit
def _ema_flat_kernel(ema_ptr, param_ptr, n, w, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(ema_ptr + offs, mask=mask)
    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    tl.store(ema_ptr + offs, _lerp(e, p, w), mask=mask)


@triton.jit
def _ema_multi_kernel(ema_ptrs, param_ptrs, sizes, blk_tensor, blk_idx, w, BLOCK: tl.constexpr,
                      PARAM_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    ti = tl.load(blk_tensor + pid)
    n = tl.load(sizes + ti)
    ema = tl.load(ema_ptrs + ti).to(tl.pointer_type(tl.float32))
    par = tl.load(param_ptrs + ti).to(tl.pointer_type(PARAM_DTYPE))
    if ALIGNED:  # every base address is 16-byte aligned: lets the compiler emit vector loads
        ema = tl.multiple_of(ema, 16)
        par = tl.multiple_of(par, 16)
    offs = tl.load(blk_idx + pid) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(ema + offs, mask=mask)
    p = tl.load(par + offs, mask=mask).to(tl.float32)
    tl.store(ema + offs, _lerp(e, p, w), mask=mask)


# Work tables depend only on (addresses, sizes, BLOCK, device): cache the last few (a training loop reuses one list).
_TABLES: dict = {}
_TABLES_MAX = 16


def _work_tables(ema: list[torch.Tensor], par: list[torch.Tensor], block: int):
    """int64 device tables: ema addresses, param addresses, sizes, and per program (tensor index, block index)."""
    sizes = [e.numel() for e in ema]
    key = (tuple(e.data_ptr() for e in ema), tuple(p.data_ptr() for p in par), tuple(sizes), block, ema[0].device)
    if key in _TABLES:
        return _TABLES[key]
    counts = torch.tensor([triton.cdiv(n, block) for n in sizes], dtype=torch.int64)
    blk_tensor = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    first = torch.cumsum(counts, 0) - counts  # each tensor's first entry in the flat table
    blk_idx = torch.arange(int(counts.sum())) - first[blk_tensor]
    host = (torch.tensor(key[0], dtype=torch.int64), torch.tensor(key[1], dtype=torch.int64),
            torch.tensor(sizes, dtype=torch.int64), blk_tensor, blk_idx)
    tables = tuple(v.to(ema[0].device) for v in host)
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = tables
    return tables


@torch.no_grad()
def ema_update_triton_(ema, params, decay, *, BLOCK: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_WARPS) -> None:
    """Triton `ema <- decay*ema + (1-decay)*param` over a tensor or a list (see `reference.ema_update_reference_`).

    One launch per parameter dtype. Non-contiguous params are read through a contiguous copy; a non-contiguous ema is
    updated through a contiguous copy that is written back (both correct, both cost an extra pass).
    """
    ema, params, decay = check_ema_args(ema, params, decay)
    w = 1.0 - decay
    groups: dict[torch.dtype, tuple[list, list]] = {}
    writeback = []
    for e, p in zip(ema, params):
        if e.numel() == 0:
            continue
        if e.device != ema[0].device:
            raise ValueError(f"ema_update_: all tensors must be on one device, got {ema[0].device} and {e.device}")
        work = e if e.is_contiguous() else e.contiguous()
        if work is not e:
            writeback.append((e, work))
        es, ps = groups.setdefault(p.dtype, ([], []))
        es.append(work)
        ps.append(p.detach().contiguous())
    for pdt, (es, ps) in groups.items():
        tl_dtype(pdt)  # clear error for an unsupported param dtype
        if len(es) == 1:
            n = es[0].numel()
            blk = block_for(n, BLOCK)
            _ema_flat_kernel[(triton.cdiv(n, blk),)](es[0], ps[0], n, w, BLOCK=blk, num_warps=num_warps)
            continue
        blk = block_for(max(e.numel() for e in es), BLOCK)
        eptr, pptr, sizes, blk_tensor, blk_idx = _work_tables(es, ps, blk)
        aligned = all(x.data_ptr() % 16 == 0 for x in es + ps)
        _ema_multi_kernel[(blk_tensor.numel(),)](eptr, pptr, sizes, blk_tensor, blk_idx, w, BLOCK=blk,
                                                 PARAM_DTYPE=tl_dtype(pdt), ALIGNED=aligned, num_warps=num_warps)
    for e, work in writeback:
        e.copy_(work)
