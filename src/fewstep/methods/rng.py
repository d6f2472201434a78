"""Capture and restore the global RNG state, so auxiliary (teacher) passes replay the student pass's randomness.

TwinFlow restores the RNG before every no-grad teacher pass: with dropout (or any stochastic layer) each teacher pass
then draws the same masks as the student pass it is compared with. The state covers the CPU generator and, when CUDA
is available, the generator of one CUDA device.
"""
from __future__ import annotations

import torch


def _cuda_index(device) -> int | None:
    """The CUDA device index whose generator to capture, or None when CUDA is not involved."""
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def capture_rng_state(device=None) -> dict:
    """Snapshot the CPU generator and (if available) the CUDA generator of `device` (default: the current device).

    Returns an opaque dict for `restore_rng_state`. A CPU `device` captures the CPU generator only.
    """
    state = {"cpu": torch.get_rng_state()}
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = (index, torch.cuda.get_rng_state(index))
    return state


def restore_rng_state(state: dict) -> None:
    """Put the generators back to a snapshot taken by `capture_rng_state` (the snapshot stays reusable)."""
    if not isinstance(state, dict) or "cpu" not in state:
        raise TypeError(f"restore_rng_state: expected a dict from capture_rng_state, got {type(state).__name__}")
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        index, cuda_state = state["cuda"]
        torch.cuda.set_rng_state(cuda_state, index)
