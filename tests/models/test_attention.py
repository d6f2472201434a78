"""Masked attention in a forward that builds a graph avoids cuDNN's SDPA (pytorch#196678: NaN dQ on Hopper), also in
the recompute of a gradient-checkpointed block; everything else keeps torch's kernel choice."""
from types import SimpleNamespace

import pytest
import torch

from fewstep.lora import prepare_trainable
from fewstep.models import get_adapter
from fewstep.models.attention import sdpa_switches


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call as (has a mask, cuDNN's switch at the call, grad enabled)."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        calls.append((mask is not None, torch.backends.cuda.cudnn_sdp_enabled(), torch.is_grad_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _padded_and_unpadded(adapter, comps):
    a = adapter.split_cond(adapter.encode_prompts(comps, ["a cat"]))[0]
    b = adapter.split_cond(adapter.encode_prompts(comps, ["a big black cat sitting on a red sofa in the sun"]))[0]
    padded, same = adapter.collate_cond([a, b]), adapter.collate_cond([a, a])
    assert "prompt_embeds_mask" in padded and "prompt_embeds_mask" not in same
    return padded, same


def _encoded(adapter, comps, calls):
    """The padded and unpadded batches, with the text encoder's own SDPA calls forgotten."""
    padded, same = _padded_and_unpadded(adapter, comps)
    calls.clear()
    return padded, same


def test_masked_forward_with_grad_runs_without_cudnn_attention(tiny, sdpa_calls):
    adapter, comps = tiny("qwenimage")
    padded, same = _encoded(adapter, comps, sdpa_calls)
    x, sig = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    assert torch.backends.cuda.cudnn_sdp_enabled()
    x.requires_grad_(True)
    adapter.forward(comps.denoiser, x, sig, padded).sum().backward()
    assert sdpa_calls and all(masked and not cudnn for masked, cudnn, _ in sdpa_calls)
    sdpa_calls.clear()
    adapter.forward(comps.denoiser, x, sig, same)  # unmasked: cuDNN stays torch's choice
    assert sdpa_calls and all(not masked and cudnn for masked, cudnn, _ in sdpa_calls)
    sdpa_calls.clear()
    with torch.no_grad():  # no backward: cuDNN's forward is fine (teacher passes, sampling)
        adapter.forward(comps.denoiser, x, sig, padded)
    assert sdpa_calls and all(masked and cudnn for masked, cudnn, _ in sdpa_calls)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored


def test_checkpointed_blocks_recompute_with_the_forwards_kernels(tiny_dirs, sdpa_calls):
    """prepare_trainable's gradient checkpointing recomputes a masked block in backward without cuDNN's SDPA too
    (diffusers' default checkpoint function recomputes under the switches of backward time: cuDNN on), and the
    gradients are those without checkpointing."""
    adapter = get_adapter("qwenimage")
    grads = {}
    for checkpointing in (False, True):
        comps = adapter.load(tiny_dirs("qwenimage"))
        cfg = SimpleNamespace(model_type="full", gradient_checkpointing=checkpointing)
        params = prepare_trainable(cfg, adapter, comps.denoiser, anystep_embeddings=False)
        comps.denoiser.train()
        padded, _ = _encoded(adapter, comps, sdpa_calls)
        x, sig = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.7])
        out = adapter.forward(comps.denoiser, x, sig, padded)
        n_forward = len(sdpa_calls)
        out.square().mean().backward()
        recomputed = sdpa_calls[n_forward:]
        assert bool(recomputed) is checkpointing
        assert all(masked and not cudnn and grad for masked, cudnn, grad in recomputed)
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        sdpa_calls.clear()
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_sdpa_switches_restores_every_switch_after_an_error():
    before = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in ("flash", "mem_efficient", "cudnn")}
    with pytest.raises(RuntimeError, match="boom"):
        with sdpa_switches(cudnn=False, flash=False):
            assert not torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
            raise RuntimeError("boom")
    assert {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in before} == before
    once = sdpa_switches(cudnn=False)  # one recompute context, entered at each backward of a retained graph
    for _ in range(2):
        with once:
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_masked_attention_bug_is_avoided_on_cuda():
    """pytorch#196678's inputs (length 704 = 64 mod 128, a mask, every logit near -120) through `masked_attention`:
    a finite dQ matching fp32's (the GPU check runs this; whether cuDNN alone fails depends on its version)."""
    import math

    from fewstep.models.attention import masked_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    L, D = 704, 64
    q = torch.randn(1, 1, L, D, device="cuda", generator=g) * 0.1
    k = torch.randn(1, 1, L, D, device="cuda", generator=g) * 0.1
    v = torch.randn(1, 1, L, D, device="cuda", generator=g)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(D)
    mask = torch.ones(L, L, dtype=torch.bool, device="cuda").tril()[None, None]
    dout = torch.randn(1, 1, L, D, device="cuda", generator=g)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        qq = q.to(dtype).requires_grad_(True)
        with masked_attention(True):
            out = torch.nn.functional.scaled_dot_product_attention(qq, k.to(dtype), v.to(dtype), attn_mask=mask)
        out.backward(dout.to(dtype))
        grads[dtype] = qq.grad.float()
    assert torch.isfinite(grads[torch.bfloat16]).all()
    rel = (grads[torch.bfloat16] - grads[torch.float32]).norm() / grads[torch.float32].norm()
    assert rel < 0.05, rel
