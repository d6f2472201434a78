"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""
import fewstep  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA, before any kernel module is imported)
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (b must not be all zeros)."""
    a, b = a.double(), b.double().to(a.device)
    nb = b.norm().item()
    assert nb > 0, "reference is all zeros: the comparison would prove nothing"
    return (a - b).norm().item() / nb
