"""Copies that do not make the host wait for the GPU.

A copy from the host to a GPU with `non_blocking=True` returns without waiting for the GPU's queue to drain (the
source, ordinary pageable memory, is staged by the driver before the call returns, so it may change or go at once).
The other way round it must block: a non-blocking copy from a GPU lands later, and the host would read it first.
"""
from __future__ import annotations

import torch


def copy_to(a: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`a` on `device` (in `dtype`, if given); from the host to another device without waiting for its queue."""
    device = torch.device(device)
    asynchronous = a.device.type == "cpu" and device.type != "cpu"
    return a.to(device=device, dtype=a.dtype if dtype is None else dtype, non_blocking=asynchronous)
