"""fewstep.ema.EMA: the reference warm-up, a frozen teacher at decay 1, reset, and state round trip."""
import pytest
import torch

from fewstep.ema import EMA


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]


def test_warmup_follows_reference_rule_and_blends():
    src = _params(0)
    ema = EMA(src, 0.99, backend="torch")
    expected_d = 0.0
    for step in range(4):
        before = [s.clone() for s in ema.shadow]
        new = _params(step + 1)
        for p, n in zip(src, new):
            p.copy_(n)
        assert ema.update() == pytest.approx(expected_d)
        for s, b, p in zip(ema.shadow, before, src):  # shadow = d * shadow + (1 - d) * param
            torch.testing.assert_close(s, expected_d * b + (1 - expected_d) * p)
        expected_d = expected_d + (1 - expected_d) * (0.99 - expected_d) / 2


def test_decay_one_is_frozen_at_the_initial_weights():
    src = _params(0)
    start = [p.clone() for p in src]
    ema = EMA(src, 1.0, backend="torch")
    assert ema.frozen and not EMA(src, 0.999, backend="torch").frozen
    for p, n in zip(src, _params(1)):
        p.copy_(n)
    ema.update()
    for s, p0 in zip(ema.shadow, start):
        assert torch.equal(s, p0)


def test_reset_and_state_dict_round_trip():
    src = _params(0)
    ema = EMA(src, 0.9, backend="torch")
    ema.update()
    ema.update()
    state = ema.state_dict()
    other = EMA(_params(5), 0.9, backend="torch")
    other.load_state_dict(state)
    assert other.decay == ema.decay and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    for p, n in zip(src, _params(2)):
        p.copy_(n)
    ema.reset()
    assert ema.decay == 0.0 and all(torch.equal(s, p) for s, p in zip(ema.shadow, src))


def test_state_dict_holds_the_shadow_itself_not_a_host_copy():
    """A checkpoint's `torch.save` moves the shadow to host memory one tensor at a time; `state_dict` must not copy
    the whole of it there first (10 GiB per rank for a 20B full fine-tune on 8 GPUs). A meta-device shadow stands in
    for one on the GPU: any copy out of it raises."""
    ema = EMA([torch.empty(5, 3, device="meta"), torch.empty(7, device="meta")], 0.9, backend="torch")
    state = ema.state_dict()
    assert all(a is b for a, b in zip(state["shadow"], ema.shadow)) and len(state["shadow"]) == 2


def test_fused_kernels_on_with_masters_in_host_memory_uses_the_reference(monkeypatch):
    """On a GPU node (no Triton interpreter), offload_optimizer keeps the fp32 masters, and so the EMA, in host memory:
    `fused_kernels: on` updates it with the torch reference instead of stopping at the first update."""
    from fewstep.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    src = _params(0)
    on, ref = EMA(src, 0.9, backend="triton"), EMA([p.clone() for p in src], 0.9, backend="torch")
    for step in range(3):
        for p, n in zip(src, _params(step + 1)):
            p.copy_(n)
        on.update()
        ref.sources = [p.clone() for p in src]
        ref.update()
    assert all(torch.equal(a, b) for a, b in zip(on.shadow, ref.shadow))
