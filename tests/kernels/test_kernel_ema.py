"""Multi-tensor EMA kernel vs `torch._foreach_lerp_` (the reference)."""
import pytest
import torch
from kernel_helpers import DEVICE, rel_err

from fewstep.kernels import ema_update_
from fewstep.kernels.ema import ema_update_triton_
from fewstep.kernels.reference import ema_update_reference_


GUARD = -7777.0  # finite: an out-of-bounds lerp would change it (a NaN guard would stay NaN)


def guarded_views(sizes, gen, gap=7):
    """fp32 EMA tensors that are disjoint slices of one GUARD-filled buffer: a stray write changes a gap value."""
    buf = torch.full((sum(sizes) + gap * (len(sizes) + 1),), GUARD, device=DEVICE)
    views, pos = [], gap
    for n in sizes:
        v = buf[pos:pos + n]
        v.copy_(torch.randn(n, generator=gen).to(DEVICE))
        views.append(v)
        pos += n + gap
    gaps = torch.ones_like(buf, dtype=torch.bool)
    for v in views:
        off = v.storage_offset()
        gaps[off:off + v.numel()] = False
    return buf, views, gaps


@pytest.mark.parametrize("block", [256, 65536])
@pytest.mark.parametrize("decay", [0.0, 0.3, 0.999, 1.0])
def test_many_mixed_tensors(block, decay):
    """60 tensors, sizes 1..5000 (not multiples of BLOCK), fp32 and bf16 params mixed in one list."""
    g = torch.Generator().manual_seed(int(decay * 1000) + block)
    sizes = [1, 2, 3, 17, 4097, 5000] + torch.randint(1, 3000, (54,), generator=g).tolist()
    buf, ema, gaps = guarded_views(sizes, g)
    params = [torch.randn(n, generator=g).to(torch.bfloat16 if i % 3 == 0 else torch.float32).to(DEVICE)
              for i, n in enumerate(sizes)]
    ref = [e.clone() for e in ema]
    old = [e.clone() for e in ema]
    ema_update_reference_(ref, params, decay)
    ema_update_triton_(ema, params, decay, BLOCK=block)
    assert rel_err(torch.cat(ema), torch.cat(ref)) <= 1e-6
    assert (torch.cat(ema) - torch.cat(ref)).abs().max().item() <= 1e-5  # no single element skipped
    assert (buf[gaps] == GUARD).all()
    if decay == 0.0:  # first EMA update copies the parameters exactly
        assert all(torch.equal(e, p.float()) for e, p in zip(ema, params))
    if decay == 1.0:  # frozen teacher: unchanged
        assert all(torch.equal(e, r) for e, r in zip(ema, ref))
    else:  # every tensor really moved (an element the kernel skipped would keep its old value)
        assert all(not torch.equal(e, o) for e, o in zip(ema, old))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_flat_buffer(param_dtype):
    """One flat buffer (a ZeRO fp32 partition): the single-tensor kernel, 100003 elements, 16K blocks."""
    g = torch.Generator().manual_seed(0)
    buf, (ema,), gaps = guarded_views([100_003], g)
    p = torch.randn(100_003, generator=g).to(param_dtype).to(DEVICE)
    ref = ema.clone()
    ema_update_reference_(ref, p, 0.9)
    ema_update_triton_(ema, p, 0.9, BLOCK=16384)
    assert rel_err(ema, ref) <= 1e-6
    assert (buf[gaps] == GUARD).all()


def test_lora_like_shapes_and_noncontiguous_views():
    """2-D adapter weights; a transposed param view and a transposed EMA view are handled (copied) correctly."""
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 64), (64, 4), (8, 33), (33, 8), (16,)]
    ema = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    params = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    params[1] = torch.randn(4, 64, generator=g).to(DEVICE).t()  # non-contiguous param
    ema[3] = torch.randn(8, 33, generator=g).to(DEVICE).t()  # non-contiguous EMA (updated through a copy)
    assert not params[1].is_contiguous() and not ema[3].is_contiguous()
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, 0.7)
    ema_update_(ema, params, 0.7, backend="triton")
    for e, r in zip(ema, ref):
        assert e.shape == r.shape and rel_err(e, r) <= 1e-6


def test_repeated_updates_reuse_tables():
    """The cached work tables stay correct over steps (same list, changing values)."""
    g = torch.Generator().manual_seed(2)
    ema = [torch.randn(n, generator=g).to(DEVICE) for n in (10, 300, 7)]
    ref = [e.clone() for e in ema]
    params = [torch.empty(n, device=DEVICE) for n in (10, 300, 7)]
    for step, decay in enumerate([0.0, 0.5, 0.9, 0.95]):
        for p in params:
            p.copy_(torch.randn(p.numel(), generator=g).to(DEVICE))
        ema_update_reference_(ref, params, decay)
        ema_update_triton_(ema, params, decay, BLOCK=128)
        assert rel_err(torch.cat(ema), torch.cat(ref)) <= 1e-6, step


def test_bad_inputs_are_rejected():
    e = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="2 ema tensors but 1 params"):
        ema_update_([e, e.clone()], [e], 0.5, backend="triton")
    with pytest.raises(TypeError, match=r"ema\[0\] must be float32"):
        ema_update_(e.bfloat16(), e, 0.5, backend="triton")
    with pytest.raises(ValueError, match="decay must be in"):
        ema_update_(e, e.clone(), 1.5, backend="triton")
    with pytest.raises(ValueError, match=r"ema\[0\] has 10 elements but params\[0\] has 9"):
        ema_update_(e, torch.randn(9, device=DEVICE), 0.5, backend="triton")
    with pytest.raises(TypeError, match=r"params\[0\] must be floating point"):
        ema_update_(e, torch.arange(10, device=DEVICE), 0.5, backend="triton")
