"""TwinFlow building blocks: RCGM target/rollout, CFG enhancement, RNG replay, rectify (groups and times:
test_twinflow_times.py)."""
import pytest
import torch
from torch import nn

from fewstep.methods.rng import capture_rng_state, restore_rng_state
from fewstep.methods.twinflow import (cfg_enhanced_target, fake_samples, rcgm_rollout, rcgm_target, rectify_loss,
                                      select_rows)

SHAPE = (3, 4, 4)


def bc(s, like):
    return s.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def point_mass_model(x_star):
    """Exact velocity field for data concentrated at x_star: every path is straight, F(x_t, t, tt) = (x_t - x*)/|t|."""
    def model(x, t, tt, cond):
        return (x - x_star) / bc(t.abs(), x)
    return model


def straight_batch(B, dtype, seed=0, d_min=0.0):
    """x_t on straight paths from x* to z at times t > tt (some with t - tt below delta_t), and v = z - x*."""
    g = torch.Generator().manual_seed(seed)
    x_star = torch.randn(1, *SHAPE, generator=g, dtype=dtype)
    z = torch.randn(B, *SHAPE, generator=g, dtype=dtype)
    t = (0.2 + 0.8 * torch.rand(B, generator=g, dtype=dtype))
    tt = t * torch.rand(B, generator=g, dtype=dtype)
    tt[:2] = t[:2] - torch.tensor([0.004, 0.0], dtype=dtype)  # one row with 0 < t - tt < delta_t, one with tt == t
    x_t = bc(t, z) * z + (1 - bc(t, z)) * x_star
    return x_star, x_t, t, tt, z - x_star


def smooth_model(seed=1, scale=1.0):
    """A fixed nonlinear any-step model (not a straight flow)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(SHAPE[0], SHAPE[0], generator=g, dtype=torch.float64) * 0.5

    def model(x, t, tt, cond):
        tb, ttb = bc(t, x), bc(tt, x)
        h = torch.einsum("ij,bjkl->bikl", W.to(x.dtype), x)
        return scale * (torch.tanh(h) * (1 + tb) + 0.3 * ttb * x + 0.1 * torch.sin(3 * tb))
    return model


def test_select_rows():
    m = torch.tensor([True, False, True])
    cond = {"emb": torch.arange(6).reshape(3, 2), "mask": [torch.ones(3, 1)], "name": "x", "none": None}
    out = select_rows(cond, m)
    assert out["emb"].tolist() == [[0, 1], [4, 5]] and out["mask"][0].shape == (2, 1) and out["name"] == "x"
    with pytest.raises(ValueError, match="ids.*batch-aligned"):
        select_rows({"ids": torch.zeros(7, 3)}, m)


# ----------------------------------------------------------------------------------------------------------------------
# RCGM target

@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_rcgm_straight_flow_is_self_consistent(order, dtype, tol):
    x_star, x_t, t, tt, v = straight_batch(8, dtype)
    model = point_mass_model(x_star)
    F = model(x_t, t, tt, None)
    T = rcgm_target(model, x_t, t, tt, v, F, order=order, delta_t=0.01, clamp=1.0)
    assert torch.isfinite(T).all()
    assert ((T - v).norm() / v.norm()).item() < tol
    # the rollout integral is the exact displacement from t_m = max(t - delta, tt) to tt
    acc = rcgm_rollout(model, x_t, t, tt, v, order=order, delta_t=0.01)
    t_m = torch.maximum(t - 0.01, tt)
    expected = bc(t_m - tt, v) * v if order > 0 else torch.zeros_like(v)
    assert ((acc - expected).norm() / v.norm()).item() < tol


def test_rcgm_tends_to_flow_matching_target_as_tt_to_t():
    dtype = torch.float64
    _, x_t, t, _, v = straight_batch(6, dtype)
    model = smooth_model()
    E = v + 0.3 * torch.randn_like(v)  # an arbitrary (enhanced) target
    delta = 0.01
    errs = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        tt = t - delta * (1 + eps)  # t - tt just above delta
        F = model(x_t, t, tt, None)
        T = rcgm_target(model, x_t, t, tt, E, F, order=2, delta_t=delta, clamp=1e6)
        errs.append(((T - E).norm() / E.norm()).item())
    assert errs[-1] < 1e-3 and all(b < a for a, b in zip(errs, errs[1:]))
    for tt in (t - 0.5 * delta, t.clone()):  # below delta and tt == t exactly: plain flow matching, finite
        F = model(x_t, t, tt, None)
        T = rcgm_target(model, x_t, t, tt, E, F, order=2, delta_t=delta, clamp=1e6)
        assert torch.isfinite(T).all()
        torch.testing.assert_close(T, E, rtol=1e-12, atol=1e-12)


def test_rcgm_clamp_bounds_residual():
    x_star, x_t, t, tt, v = straight_batch(8, torch.float32)
    F = point_mass_model(x_star)(x_t, t, tt, None)
    far_teacher = smooth_model(scale=50.0)
    for c in (0.5, 1.0):
        T = rcgm_target(far_teacher, x_t, t, tt, v, F, order=2, delta_t=0.01, clamp=c)
        resid = (F - T).abs()
        assert resid.max().item() <= c * (1 + 1e-6)
        assert (resid >= c * (1 - 1e-6)).float().mean().item() > 0.5  # the clamp is active, not trivially satisfied
    # adversarial rows (rcgm_mask False) get the target itself
    mask = torch.ones(8, dtype=torch.bool)
    mask[3] = False
    T = rcgm_target(far_teacher, x_t, t, tt, v, F, order=2, delta_t=0.01, clamp=1.0, rcgm_mask=mask)
    assert torch.equal(T[3], v[3])


def test_rcgm_rollout_matches_hand_written_loop():
    dtype = torch.float64
    _, x_t, t, tt, _ = straight_batch(5, dtype)
    model = smooth_model()
    E = torch.randn_like(x_t)
    acc = rcgm_rollout(model, x_t, t, tt, E, order=3, delta_t=0.02)
    expected = torch.zeros_like(x_t)
    for i in range(5):  # per row, scalar times: pre-step then 3 equal Euler sub-steps
        ti, tti = t[i].item(), tt[i].item()
        tm = max(ti - 0.02, tti)
        x = x_t[i:i + 1] - (ti - tm) * E[i:i + 1]
        s = [tm + (tti - tm) * k / 3 for k in range(4)]
        for k in range(3):
            G = model(x, torch.tensor([s[k]], dtype=dtype), torch.tensor([s[k + 1]], dtype=dtype), None)
            x = x - (s[k] - s[k + 1]) * G
            expected[i] += ((s[k] - s[k + 1]) * G)[0]
    torch.testing.assert_close(acc, expected, rtol=1e-12, atol=1e-12)


def test_rcgm_rollout_of_bf16_input_accumulates_in_fp32():
    """With bf16 x_t the rollout's state and integral stay fp32 (summed in bf16, small steps lose ~3 digits): I equals
    an fp32 loop over the bf16 teacher's outputs, and is fp32."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, *SHAPE, generator=g).bfloat16()
    E = torch.randn(3, *SHAPE, generator=g)
    t, tt = torch.tensor([0.9, 0.6, 0.35]), torch.tensor([0.1, 0.3, 0.05])

    def teacher(x, s, ss, cond):  # a bf16 model: bf16 in, bf16 out
        return (torch.tanh(x.float()) * (1 + bc(s, x).float()) + 2 + bc(ss, x).float()).bfloat16()

    delta, N = 0.05, 3
    acc = rcgm_rollout(teacher, x_t, t, tt, E, order=N, delta_t=delta)
    expected = torch.zeros(x_t.shape)
    for i in range(3):  # per row: fp64 times, fp32 state; the teacher sees the state in bf16
        ti, tti = t[i].item(), tt[i].item()
        tm = max(ti - delta, tti)
        x = x_t[i:i + 1].float() - (ti - tm) * E[i:i + 1]
        s = [tm + (tti - tm) * (k / N) for k in range(N + 1)]
        for k in range(N):
            hG = (s[k] - s[k + 1]) * teacher(x.bfloat16(), torch.tensor([s[k]]), torch.tensor([s[k + 1]]), None).float()
            x = x - hG
            expected[i] += hG[0]
    torch.testing.assert_close(acc, expected, rtol=1e-6, atol=1e-7, check_dtype=False)
    assert acc.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# RNG replay

class DropoutTeacher(nn.Module):
    """Records the dropout mask of every call."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.masks = []

    def forward(self, x, t, tt, cond):
        out = self.drop(torch.ones_like(x))
        self.masks.append(out != 0)
        return x * out * 0.01 + bc(t, x)


def test_rng_restore_gives_identical_dropout_masks():
    teacher = DropoutTeacher().train()
    _, x_t, t, tt, v = straight_batch(4, torch.float32)
    rcgm_rollout(teacher, x_t, t, tt, v, order=3, delta_t=0.01)  # captures its own state: 3 identical masks
    assert len(teacher.masks) == 3 and all(torch.equal(m, teacher.masks[0]) for m in teacher.masks)
    teacher.masks.clear()
    state = capture_rng_state()
    rcgm_rollout(teacher, x_t, t, tt, v, order=3, delta_t=0.01, rng_state=state)
    cfg_enhanced_target(teacher, x_t, t, v, {}, {}, ratio=0.5, rng_state=state)
    assert len(teacher.masks) == 5
    assert all(torch.equal(m, teacher.masks[0]) for m in teacher.masks)
    assert 0.3 < teacher.masks[0].float().mean().item() < 0.7
    # without restoring, the masks differ (the test can see a broken restore)
    teacher.masks.clear()
    teacher(x_t, t, tt, None), teacher(x_t, t, tt, None)
    assert not torch.equal(*teacher.masks)


def test_capture_restore_roundtrip():
    state = capture_rng_state()
    a = torch.rand(5)
    restore_rng_state(state)
    assert torch.equal(a, torch.rand(5))
    restore_rng_state(state)
    assert torch.equal(a, torch.rand(5))  # the snapshot is reusable
    with pytest.raises(TypeError, match="capture_rng_state"):
        restore_rng_state(torch.get_rng_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_restore_cuda():
    state = capture_rng_state("cuda")
    a = torch.rand(5, device="cuda")
    restore_rng_state(state)
    assert torch.equal(a, torch.rand(5, device="cuda"))


# ----------------------------------------------------------------------------------------------------------------------
# CFG enhancement, fake samples, rectify

def cond_model(x, t, tt, cond):
    return x * 0.5 + bc(t, x) * cond["c"].reshape(-1, 1, 1, 1).to(x.dtype)


def test_cfg_enhanced_target():
    B = 6
    x_t = torch.randn(B, *SHAPE, dtype=torch.float64)
    v = torch.randn_like(x_t)
    t = torch.tensor([1.0, 0.5, 0.3, 0.9, 0.0, -0.4], dtype=torch.float64)
    adv = torch.tensor([False, False, False, False, False, True])
    cond, uncond = {"c": torch.full((B,), 2.0)}, {"c": torch.full((B,), -1.0)}
    E, mask = cfg_enhanced_target(cond_model, x_t, t, v, cond, uncond, ratio=0.5, adv_mask=adv)
    assert mask.tolist() == [False, True, True, True, False, False]  # t strictly inside (0, 1), not adversarial
    fc, fu = cond_model(x_t, t, t, cond), cond_model(x_t, t, t, uncond)
    expected = torch.where(bc(mask, v).bool(), v + 0.5 * (fc - fu), v)
    torch.testing.assert_close(E, expected, rtol=1e-12, atol=1e-12)
    # a frozen teacher (EMA decay 1): the base of the enhanced rows is the teacher's unconditional field, as the
    # reference (`if self.emd == 1.0: target = F_T(uncond) + r (F_T(cond) - F_T(uncond))`); other rows keep v
    for used_rows_only in (False, True):
        E1, _ = cfg_enhanced_target(cond_model, x_t, t, v, cond, uncond, ratio=0.5, adv_mask=adv,
                                    frozen_teacher=True, used_rows_only=used_rows_only)
        torch.testing.assert_close(E1, torch.where(bc(mask, v).bool(), fu + 0.5 * (fc - fu), v), rtol=1e-12,
                                   atol=1e-12)
    E0, _ = cfg_enhanced_target(cond_model, x_t, t, v, cond, None, ratio=0.0)
    assert torch.equal(E0, v)
    with pytest.raises(ValueError, match="uncond"):
        cfg_enhanced_target(cond_model, x_t, t, v, cond, None, ratio=0.5)


def test_fake_samples_is_one_step_generator_without_grad():
    lin = nn.Linear(4, 4)
    model = lambda x, t, tt, cond: lin(x) * bc(t - tt, x)  # noqa: E731
    z = torch.randn(3, 2, 4)
    x = fake_samples(model, z, None)
    assert not x.requires_grad
    torch.testing.assert_close(x, (z - lin(z)).detach())


@pytest.mark.parametrize("max_rows, passes", [(None, [(8, [-1] * 4 + [1] * 4)]), (8, [(8, [-1] * 4 + [1] * 4)]),
                                              (7, [(4, [-1] * 4), (4, [1] * 4)])])
def test_rectify_takes_both_fields_in_one_pass_where_the_rows_fit(max_rows, passes):
    """The fake (-t) and real (+t) fields in one pass over the rows twice, each row with its own conditioning, where
    2n rows are at most `max_rows` (the micro-batch the memory plan counts), else in two passes: the same loss."""
    calls = []

    def model(x, t, tt, cond):
        calls.append((x.shape[0], torch.sign(t).int().tolist()))
        return torch.tanh(x * (1.0 + t.view(-1, 1, 1)) + cond["c"].view(-1, 1, 1))

    gen = torch.Generator().manual_seed(3)
    x_hat, F_e2e, cond = torch.randn(4, 5, 3, generator=gen), torch.randn(4, 5, 3), {"c": torch.randn(4)}
    loss = rectify_loss(model, x_hat, F_e2e, cond, torch.Generator().manual_seed(0), max_rows=max_rows)
    assert calls == passes
    calls.clear()
    ref = rectify_loss(model, x_hat, F_e2e, cond, torch.Generator().manual_seed(0), max_rows=1)  # two passes
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_rectify_loss_gradient_follows_fake_minus_real_gap():
    g = torch.tensor([0.3, -0.2, 0.1])  # F(x, -t) - F(x, t) = g everywhere (|g| < 1: not clamped)
    model = lambda x, t, tt, cond: x * 0 + torch.where(bc(t < 0, x).bool(), g, torch.zeros_like(g))  # noqa: E731
    F_e2e = torch.randn(4, 5, 3, requires_grad=True)
    x_hat = torch.randn(4, 5, 3)
    loss = rectify_loss(model, x_hat, F_e2e, None, torch.Generator().manual_seed(0))
    loss.backward()
    D, c = 15, 1e-3
    m = (g**2).mean()
    w = (m / (c**2 + 1e-8) + 1) ** -0.5  # the reference's Barron weight
    expected = (w * 2 * g / (D * c) / 4).expand(4, 5, 3)  # d/dF of mean_rows(w m / c), F - T = g
    torch.testing.assert_close(F_e2e.grad, expected, rtol=1e-5, atol=0)
    # a large gap is clamped to +-1
    big = lambda x, t, tt, cond: x * 0 + torch.where(bc(t < 0, x).bool(), 5 * g, 0 * g)  # noqa: E731
    F2 = F_e2e.detach().clone().requires_grad_(True)
    rectify_loss(big, x_hat, F2, None).backward()
    gc = (5 * g).clamp(-1, 1)
    mc = (gc**2).mean()
    expected = ((mc / (c**2 + 1e-8) + 1) ** -0.5 * 2 * gc / (D * c) / 4).expand(4, 5, 3)
    torch.testing.assert_close(F2.grad, expected, rtol=1e-5, atol=0)


def test_methods_import_no_trainer_stack():
    import subprocess
    import sys
    code = ("import sys, fewstep.methods.twinflow, fewstep.methods.diff2flow, fewstep.methods.rng; "
            "bad = [m for m in ('diffusers', 'deepspeed', 'transformers', 'peft') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rectify_loss_resolves_a_gap_below_bf16_resolution():
    """bf16 F_e2e ~ 1 and a fake - real gap of 2^-10 (under bf16's spacing there): F_grad and the target F - F_grad
    must be formed in fp32, else the gap rounds away and L_rectify is 0. Checked against the Barron loss in fp64."""
    F_e2e = (1 + 0.1 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))).bfloat16()
    seen = {}

    def model(x, t, tt, cond):  # fp32 fields 0.75 and 0.75 +- 2^-10 (exact in fp32; 0.75 in bf16)
        out = 0.75 + 2.0 ** -10 * torch.sign(x.float()) * bc(t < 0, x).float()
        seen[len(seen)] = out
        return out

    loss = rectify_loss(model, torch.randn(4, *SHAPE).bfloat16(), F_e2e, None, torch.Generator().manual_seed(0))
    fake, real = seen[0].double().split(4)  # one pass over the rows twice: fake (-t'), then real (+t')
    gap = (fake - real).clamp(-1, 1)  # F - T, T = sg(F) - F_grad
    assert gap.abs().max() == 2.0 ** -10
    m = gap.square().reshape(4, -1).mean(1)
    c = 1e-3
    w = (m / (c * c + 1e-8) + 1) ** -0.5  # the reference's Barron weight (alpha 1, c = 1e-3)
    torch.testing.assert_close(loss.double(), (w * m / c).mean(), rtol=1e-5, atol=0)
