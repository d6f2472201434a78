"""Fixtures for the kernel tests (CPU: Triton interpreter; GPU when CUDA is present)."""
import fewstep  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA, before any kernel module is imported)
import pytest
import torch


@pytest.fixture
def poison(monkeypatch):
    """Make every output the RCGM launchers allocate start as NaN, so an unwritten element shows up."""
    from fewstep.kernels import rcgm

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(rcgm, "_empty", nan_empty)
