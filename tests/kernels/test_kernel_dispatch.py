"""Backend switch: resolve_backend and the auto/triton/torch choice of the public dispatchers."""
import subprocess

import pytest
import torch
import triton
import triton.language as tl

import fewstep.kernels as K
from fewstep.kernels import api, resolve_backend
from fewstep.kernels._dispatch import round_bf16, to_out
from fewstep_testing import PY, REPO, cpu_env


@triton.jit
def _store_bf16(x_ptr, y_ptr, n, RTNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(y_ptr + idx, to_out(tl.load(x_ptr + idx, mask=mask), tl.bfloat16, RTNE_BF16), mask=mask)


def test_bf16_stores_round_to_nearest_even_as_torch_does():
    """Every kernel's bf16 store goes through `to_out`. The interpreter truncates, so there it rounds by hand: exact
    ties go to the even neighbour (half of them upwards), as torch's `.to(bfloat16)` and a GPU's cast do."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    high = torch.randint(0x0080, 0x7F00, (4096,), generator=g, dtype=torch.int32)  # normal bf16 magnitudes
    sign = torch.randint(0, 2, (4096,), generator=g, dtype=torch.int32) << 31
    ties = ((high << 16) | 0x8000 | sign).view(torch.float32)  # exactly halfway between two bf16 values
    x = torch.cat([ties, torch.randn(4093, generator=g)]).to(device)  # 4093: not a multiple of the block
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _store_bf16[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), RTNE_BF16=round_bf16(), BLOCK=1024)
    expected = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))
    assert (expected[:4096].float().abs() > x[:4096].abs()).float().mean().item() == pytest.approx(0.5, abs=0.05)


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
    monkeypatch.setattr(api, name, boom)


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
    real = api.ema_update_triton_
    monkeypatch.setattr(api, "ema_update_triton_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    K.ema_update_(torch.randn(3, device="cuda"), torch.randn(3, device="cuda"), 0.5)
    assert calls


# A fresh process, the repository root on sys.path (as under `python -m pytest` there), no TRITON_INTERPRET set and no
# GPU: `first` runs, then one fused RCGM loss (forward and backward) through the interpreter, or its refusal.
_PROBE = """
import sys
sys.path.insert(0, {repo!r})
{first}
import torch
import fewstep.kernels as K
F = torch.randn(2, 5, requires_grad=True)
try:
    loss, _ = K.rcgm_target_loss(F, None, torch.randn(2, 5), 0.5, 0.0, delta_t=0.01, clamp=1.0, backend="triton")
    loss.sum().backward()
    print("ran", bool(F.grad.abs().sum() > 0))
except RuntimeError as e:
    print("refused:", e)
"""


def _probe(first: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in cpu_env(CUDA_VISIBLE_DEVICES="").items() if k != "TRITON_INTERPRET"}
    return subprocess.run([PY, "-c", _PROBE.format(repo=REPO, first=first)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_repo_kernels_folder_found_by_transformers_leaves_triton_alone():
    """transformers imports any top-level `kernels` it finds (looking for Hugging Face's kernel-hub package), so with
    the repository root on sys.path it imports this folder, before fewstep. That import must not import Triton (which
    would fix Triton's library in compiled mode before `import fewstep` sets TRITON_INTERPRET: the interpreted kernels
    then fail inside tl.sum) and must not pass for the hub package."""
    p = _probe("import transformers.integrations.hub_kernels\n"
               "from transformers.utils import is_kernels_available\n"
               "assert 'kernels' in sys.modules and not is_kernels_available()\n"
               "assert 'triton' not in sys.modules, 'the bare kernels import imported triton'")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "ran True", p.stdout


def test_triton_imported_before_fewstep_is_a_clear_refusal_on_cpu():
    p = _probe("import triton.language")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("refused: rcgm_target_loss: Triton was imported before TRITON_INTERPRET=1"), p.stdout
    assert "import fewstep before anything that imports triton" in p.stdout
