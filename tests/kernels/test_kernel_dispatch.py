"""Backend switch: resolve_backend and the auto/triton/torch choice of the public dispatchers."""
import pytest
import torch

import fewstep.kernels as K
from fewstep.kernels import resolve_backend


def test_resolve_backend_maps_the_config_switch():
    assert resolve_backend("auto") == "auto"
    assert resolve_backend("on") == "triton" and resolve_backend("ON") == "triton" and resolve_backend(True) == "triton"
    assert resolve_backend("off") == "torch" and resolve_backend(False) == "torch"


@pytest.mark.parametrize("bad", ["yes", "triton", "", None, 1])
def test_resolve_backend_rejects_other_values(bad):
    with pytest.raises(ValueError, match="fused_kernels: expected one of 'auto', 'on', 'off'"):
        resolve_backend(bad)


def _forbid(monkeypatch, name):
    def boom(*a, **k):
        raise AssertionError(f"{name} must not run here")
    monkeypatch.setattr(K, name, boom)


def test_auto_uses_the_reference_for_cpu_tensors(monkeypatch):
    for name in ("ema_update_triton_", "rcgm_substep_triton_", "rcgm_target_loss_triton"):
        _forbid(monkeypatch, name)
    e, p = torch.randn(5), torch.randn(5)
    expected = 0.5 * e + 0.5 * p
    K.ema_update_(e, p, 0.5, backend="auto")
    assert torch.allclose(e, expected)
    x, acc, F = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    K.rcgm_substep_(x, acc, F, 1.0, 0.5, backend="auto")
    loss, T = K.rcgm_target_loss(F, None, torch.randn(2, 3), torch.ones(2), torch.zeros(2), delta_t=0.01, clamp=1.0)
    assert loss.shape == (2,) and T.shape == F.shape


def test_torch_backend_never_runs_triton(monkeypatch):
    _forbid(monkeypatch, "rcgm_substep_triton_")
    K.rcgm_substep_(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, backend="torch")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.ema_update_(torch.randn(3), torch.randn(3), 0.5, backend="triton")


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        K.ema_update_(torch.randn(3), torch.randn(3), 0.5, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_uses_triton_for_cuda_tensors(monkeypatch):
    calls = []
    real = K.ema_update_triton_
    monkeypatch.setattr(K, "ema_update_triton_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    K.ema_update_(torch.randn(3, device="cuda"), torch.randn(3, device="cuda"), 0.5)
    assert calls
