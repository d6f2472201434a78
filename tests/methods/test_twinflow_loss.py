"""twinflow_loss: one training step's loss, assembled in the reference order."""
import copy

import pytest
import torch
from torch import nn

from fewstep.kernels.reference import barron_loss_reference, rcgm_target_reference
from fewstep.methods.rng import capture_rng_state
from fewstep.methods.twinflow import cfg_enhanced_target, rcgm_rollout, select_rows, twinflow_loss
from fewstep.methods.twinflow_times import ADV, E2E, MUL, assign_groups, sample_times, time_weight
from fewstep_testing import HostToDeviceCopies

SHAPE = (3, 4, 4)
KW = dict(order=2, delta_t=0.01, clamp=1.0, enhanced_ratio=0.5, enhanced_range=(0.0, 1.0), adversarial=True,
          adversarial_weight=1.0, rectify_weight=1.0, frozen_teacher=False)


def bc(s, like):
    return s.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class PointMass(nn.Module):
    """F = (x - p x*)/|t|: the exact straight flow of data at x* when p = 1 (any tt, either sign of t)."""

    def __init__(self, x_star, p=1.0):
        super().__init__()
        self.x_star = x_star
        self.p = nn.Parameter(torch.tensor(p, dtype=x_star.dtype))

    def forward(self, x, t, tt, cond):
        slope = float(self.x_star.abs().max() / t.abs().min())  # the largest |dF/dp| of this call
        self.largest_slope = max(getattr(self, "largest_slope", 0.0), slope)
        return (x - self.p * self.x_star) / bc(t.abs(), x)


class Net(nn.Module):
    """A small any-step model that uses t, tt, their sign and the conditioning."""

    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv2d(SHAPE[0] + 3, 8, 1)
        self.out = nn.Conv2d(8, SHAPE[0], 1)
        self.drop = nn.Dropout(dropout)
        self.calls = []  # (grad enabled, batch, dropout mask, rng state after the call)

    def forward(self, x, t, tt, cond):
        c = cond["c"] if cond is not None else torch.zeros(x.shape[0])
        feats = [bc(v, x).expand(-1, 1, *x.shape[2:]).to(x.dtype) for v in (t, tt, c)]
        h = self.drop(torch.tanh(self.inp(torch.cat([x, *feats], 1))))
        self.calls.append((torch.is_grad_enabled(), x.shape[0], h.detach() != 0, None))
        return self.out(h)


def batch(B, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, generator=g, dtype=dtype)
    return x0, {"c": torch.randn(B, generator=g)}, {"c": torch.zeros(B)}


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("frozen", [False, True])
def test_straight_flow_has_zero_loss_and_gradient(order, frozen):
    """On the exact straight flow (p = 1) loss and gradient are fp64 round-off. F = (x - x*)/|t| scales with 1/|t|, and
    so does the round-off of every residual: with s the largest |dF/dp| = |x*|/|t| the passes saw, the gradient's
    round-off is about (2/c) * eps64 * s^2 = 4e-13 s^2 (residual round-off ~ eps * s, times dF/dp ~ s, over the Barron
    c = 1e-3); the bound 1e-10 s^2 is 50x the largest of 1,800 draws, so a time drawn near 0 does not make it flaky."""
    x_star = torch.randn(1, *SHAPE, dtype=torch.float64)
    for B in (1, 3, 8):
        for k in range(2):
            model = PointMass(x_star)
            _, cond, uncond = batch(B)
            loss, logs = twinflow_loss(model, model, x_star.expand(B, *SHAPE).clone(), cond, uncond,
                                       groups=assign_groups(B, k), **{**KW, "order": order, "frozen_teacher": frozen})
            loss.backward()
            scale = model.largest_slope ** 2
            assert loss.item() < 1e-18 and abs(model.p.grad.item()) < 1e-10 * scale, (B, k, scale, logs)
    # the same check sees a model off the straight flow
    model = PointMass(x_star, p=1.1)
    loss, _ = twinflow_loss(model, model, x_star.expand(8, *SHAPE).clone(), *batch(8)[1:], groups=assign_groups(8, 0),
                            **{**KW, "order": order})
    loss.backward()
    assert loss.item() > 1e-3 and abs(model.p.grad.item()) > 1e-3


def test_backprop_only_through_the_student_pass():
    student = Net()
    teacher = copy.deepcopy(student)
    teacher.calls = []
    x0, cond, uncond = batch(8)
    loss, logs = twinflow_loss(student, teacher, x0, cond, uncond, groups=assign_groups(8, 0), **KW)
    assert [c[0] for c in student.calls].count(True) == 1  # one graph: the student pass
    assert all(not c[0] for c in teacher.calls) and len(teacher.calls) == 2 + KW["order"]  # CFG + rollout
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert logs["n_e2e"] == logs["n_mul"] == logs["n_any"] == logs["n_adv"] == 2
    assert logs["l_adv"] > 0 and logs["l_rectify"] > 0 and logs["l_base"] > 0


def test_cfg_enhanced_target_keeps_the_data_velocity_and_is_continuous_in_the_ratio():
    """E = v + r*(F_T(cond) - F_T(uncond)) with an EMA teacher: a ratio of 1e-9 gives the ratio-0 loss (the plain
    target v) to 1e-6."""
    def loss_at(ratio):
        student, teacher = Net(), Net()
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.3 * torch.randn_like(p))  # a teacher whose cond and uncond fields differ from the student's
        torch.manual_seed(1)
        x0, cond, uncond = batch(8)
        loss, _ = twinflow_loss(student, teacher, x0, cond, uncond, groups=assign_groups(8, 0),
                                **{**KW, "enhanced_ratio": ratio, "frozen_teacher": False})
        return loss.item()

    base, tiny, half = loss_at(0.0), loss_at(1e-9), loss_at(0.5)
    assert abs(tiny - base) <= 1e-6 * abs(base), (base, tiny)
    assert abs(half - base) > 1e-3 * abs(base), (base, half)  # the enhancement itself is felt


def test_frozen_teacher_uses_student_for_rollout_and_teacher_for_cfg():
    student, teacher = Net(), Net()
    x0, cond, uncond = batch(8)
    twinflow_loss(student, teacher, x0, cond, uncond, groups=assign_groups(8, 0), **{**KW, "frozen_teacher": True})
    assert len(teacher.calls) == 2
    # student: 1 grad pass + 2 rollout + 1 fake-sample pass (adv rows) + 1 rectify pass (e2e rows twice: -t, +t);
    # all but the first are no-grad
    assert len(student.calls) == 5 and [c[0] for c in student.calls].count(True) == 1
    assert student.calls[-1][1] == 2 * int((assign_groups(8, 0) == 0).sum())  # 2n rows <= the batch of 8


def test_teacher_passes_replay_student_dropout_and_rng_advances():
    student = Net(dropout=0.5).train()
    x0, cond, uncond = batch(8)
    loss, _ = twinflow_loss(student, student, x0, cond, uncond, groups=assign_groups(8, 0, adversarial=False),
                            **{**KW, "adversarial": False, "order": 3})
    full = [c for c in student.calls if c[1] == 8]
    assert len(full) == 1 + 2 + 3 and full[0][0]  # student pass, CFG, rollout
    assert all(torch.equal(c[2], full[0][2]) for c in full)
    # afterwards the global RNG is where the student pass left it: teacher passes neither rewind nor advance it
    student2 = Net(dropout=0.5).train()
    fwd = student2.forward
    after = {}

    def record(*a):
        out = fwd(*a)
        if torch.is_grad_enabled():
            after["state"] = capture_rng_state()["cpu"]
        return out
    student2.forward = record
    twinflow_loss(student2, student2, x0, cond, uncond, groups=assign_groups(8, 0, adversarial=False),
                  **{**KW, "adversarial": False, "order": 3})
    assert torch.equal(torch.get_rng_state(), after["state"])


def test_teacher_randomness_does_not_leak_into_the_stream():
    def run(noisy):
        torch.manual_seed(123)
        student = Net(dropout=0.5).train()
        teacher = Net()
        fwd = teacher.forward
        teacher.forward = lambda *a: (torch.randn(1000) if noisy else None, fwd(*a))[1]
        loss, _ = twinflow_loss(student, teacher, *batch(8), groups=assign_groups(8, 0), **KW)
        return loss.item(), torch.rand(4)
    (l1, r1), (l2, r2) = run(False), run(True)
    assert l1 == l2 and torch.equal(r1, r2)


@pytest.mark.parametrize("B", [1, 2, 3, 5])
def test_any_batch_size(B):
    student = Net()
    teacher = copy.deepcopy(student)
    seen = []
    for k in range(4):
        groups = assign_groups(B, k)
        loss, logs = twinflow_loss(student, teacher, *batch(B, seed=k), groups=groups, **KW)
        loss.backward()
        assert torch.isfinite(loss)
        assert [logs[f"n_{n}"] for n in ("e2e", "mul", "any", "adv")] == torch.bincount(groups, minlength=4).tolist()
        seen += groups.tolist()
    assert sorted(set(seen)) == [0, 1, 2, 3]


def test_empty_counted_rows_still_backprop():
    student = Net()
    # order 0 counts only mul and adv rows; a micro-step with one e2e row and no rectify has a zero loss
    loss, logs = twinflow_loss(student, student, *batch(1), groups=assign_groups(1, 0, adversarial=False),
                               **{**KW, "order": 0, "adversarial": False})
    assert loss.item() == 0.0 and logs["l_base"] == 0.0
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    with pytest.raises(ValueError, match="adversarial=False"):
        twinflow_loss(student, student, *batch(4), groups=assign_groups(4, 0), **{**KW, "adversarial": False})
    with pytest.raises(ValueError, match=r"groups must have shape \[4\]"):
        twinflow_loss(student, student, *batch(4), groups=assign_groups(3, 0), **KW)


@pytest.mark.parametrize("order", [2, 0])
def test_matches_hand_assembled_loss(order):
    """Rebuild the step from the building blocks with the documented draw order (t, u1, u2, eps_adv, z, t', z'). At
    order 0 (no RCGM target, T = E) only mul and adv rows count, and L_base, L_adv are divided by their number (the
    reference's loss[mul | adv].mean()), not the batch's."""
    student, teacher = Net(), Net()
    teacher.inp.weight.data += 0.1  # a teacher different from the student
    x0, cond, uncond = batch(8)
    groups = assign_groups(8, 0)
    kw = {**KW, "order": order, "adversarial_weight": 2.0, "rectify_weight": 3.0, "backend": "torch"}
    loss, logs = twinflow_loss(student, teacher, x0, cond, uncond, groups=groups, generator=torch.Generator()
                               .manual_seed(5), **kw)

    g = torch.Generator().manual_seed(5)
    t, tt = sample_times(groups, g)
    adv, e2e = groups == ADV, groups == E2E
    with torch.no_grad():
        eps = torch.randn(int(adv.sum()), *SHAPE, generator=g)
        one = torch.ones(len(eps))
        x = x0.clone()
        x[adv] = eps - student(eps, one, 0 * one, select_rows(cond, adv))
    z = torch.randn(x.shape, generator=g)
    x_t = bc(t.abs(), z) * z + (1 - bc(t.abs(), z)) * x
    F = student(x_t, t, tt, cond)
    with torch.no_grad():
        E, _ = cfg_enhanced_target(teacher, x_t, t, z - x, cond, uncond, ratio=0.5, adv_mask=adv)
    if order:
        with torch.no_grad():
            acc = rcgm_rollout(teacher, x_t, t, tt, E, order=order, delta_t=0.01, cond=cond)
        T = rcgm_target_reference(F, acc, E, t, tt, delta_t=0.01, clamp=1.0, rcgm_mask=~adv)
        counted = torch.ones_like(adv)
    else:
        T, counted = E, (groups == MUL) | adv
    rows = barron_loss_reference(F, T) * time_weight(t, tt, adv)
    n_counted = int(counted.sum())
    assert n_counted == (8 if order else 4)
    l_base, l_adv = rows[counted & ~adv].sum() / n_counted, rows[adv].sum() / n_counted
    # rectify on e2e rows: x_hat = x_t - |t| F = z - F there
    n = int(e2e.sum())
    tp = torch.rand(n, generator=g, dtype=torch.float64).float().clamp(1e-5, 1)
    zp = torch.randn(n, *SHAPE, generator=g)
    x_hat = (x_t - F)[e2e].detach()
    x_tl = bc(tp, zp) * zp + (1 - bc(tp, zp)) * x_hat
    ce = select_rows(cond, e2e)
    with torch.no_grad():
        F_grad = (student(x_tl, -tp, -tp, ce) - student(x_tl, tp, tp, ce)).clamp(-1, 1)
    l_rect = barron_loss_reference(F[e2e], F[e2e].detach() - F_grad).mean()
    expected = l_base + 2.0 * l_adv + 0.5 * 3.0 * l_rect
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for key, ref in (("l_base", l_base), ("l_adv", l_adv), ("l_rectify", l_rect)):
        assert logs[key] == pytest.approx(ref.item(), rel=1e-5)


def test_triton_backend_matches_torch():
    results = []
    for backend in ("torch", "triton"):
        student = Net()
        teacher = copy.deepcopy(student)
        loss, _ = twinflow_loss(student, teacher, *batch(8), groups=assign_groups(8, 0),
                                generator=torch.Generator().manual_seed(1), **{**KW, "backend": backend})
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("adversarial,order,frozen,enhanced_range", [
    (True, 1, False, (0.0, 1.0)), (True, 2, False, (0.0, 1.0)), (False, 3, False, (0.0, 1.0)),
    (True, 2, True, (0.0, 1.0)), (False, 2, False, (0.3, 0.7))])
def test_teacher_passes_on_used_rows_only_give_the_same_loss(adversarial, order, frozen, enhanced_range):
    """`used_rows_only`: the CFG passes see only the enhanced rows (not e2e, t = 1, nor adv, nor t outside the range)
    and the rollout passes only the rows with a rollout (not adv, t - delta_t > tt); loss and gradients equal the
    whole-batch passes', with an EMA or a frozen teacher (whose rollout runs the student)."""
    B, delta_t = 24, 0.03  # delta_t above the mul gap's mean (0.05 t / 2), so some mul rows have no rollout
    kw = {**KW, "order": order, "delta_t": delta_t, "adversarial": adversarial, "backend": "torch",
          "frozen_teacher": frozen, "enhanced_range": enhanced_range}
    x0, cond, _ = batch(B, torch.float64, seed=3)
    uncond = {"c": torch.randn(B, dtype=torch.float64)}  # rows that differ, so a wrong uncond row would show
    cond["pair"] = [torch.randn(B, 2, dtype=torch.float64)]  # nested conditioning is selected by row too
    groups = assign_groups(B, 0, adversarial=adversarial)
    t, tt = sample_times(groups, torch.Generator().manual_seed(9), dtype=torch.float64)
    adv = groups == ADV
    lo, hi = enhanced_range
    want_cfg = int(((t > lo) & (t < hi) & ~adv).sum())
    want_rollout = int(((t.double() - delta_t > tt.double()) & ~adv).sum())
    assert 0 < want_cfg < B and 0 < want_rollout < B and want_rollout != want_cfg

    out = {}
    for rows_only in (False, True):
        student, teacher = Net().double(), Net().double()
        teacher.inp.weight.data += 0.1  # a teacher unlike the student, so that wrong rows would show
        loss, logs = twinflow_loss(student, teacher, x0, cond, uncond, groups=groups, used_rows_only=rows_only,
                                   generator=torch.Generator().manual_seed(9), **kw)
        no_grad_student_calls = [c[1] for c in student.calls if not c[0]]
        loss.backward()
        out[rows_only] = (loss.detach(), [p.grad.clone() for p in student.parameters()],
                          [c[1] for c in teacher.calls], no_grad_student_calls, logs)
    (l_all, g_all, t_all, s_all, logs_all), (l_used, g_used, t_used, s_used, logs_used) = out[False], out[True]
    # a frozen teacher's rollout runs the student; its no-grad calls: fake samples (if adv rows), the rollout, rectify
    first = int(bool(adv.any()))
    rollout_model_all, rollout_model_used = ((s_all[first:first + order], s_used[first:first + order]) if frozen
                                             else (t_all[2:], t_used[2:]))
    assert t_all[:2] == [B, B] and t_used[:2] == [want_cfg, want_cfg]
    assert rollout_model_all == [B] * order and rollout_model_used == [want_rollout] * order
    assert torch.allclose(l_used, l_all, rtol=1e-12, atol=0) and l_all > 0
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(g_used, g_all))
    assert logs_used["n_enhanced"] == logs_all["n_enhanced"] == want_cfg


def test_conditioning_that_is_not_batch_aligned_is_refused_before_any_pass():
    student = Net()
    x0, cond, uncond = batch(4)
    with pytest.raises(ValueError, match=r"twinflow_loss: uncond: cond\['c'\]: cond tensor of shape \[1\]"):
        twinflow_loss(student, student, x0, cond, {"c": torch.zeros(1)}, groups=assign_groups(4, 0), **KW)
    assert student.calls == []


@pytest.mark.parametrize("used_rows_only", [True, False])
def test_a_rank_with_no_row_to_run_still_makes_every_teacher_pass(used_rows_only):
    """ZeRO-3 gathers the weights inside every pass: a rank whose rows need no CFG or rollout pass (here e2e rows:
    t = 1, tt = 0, never enhanced; the rollout's rows mask empty) must make the same passes as the others, on one row
    whose output is dropped; skipping them hangs the ranks that have rows (a 2-rank ZeRO-3 run did)."""
    teacher = Net().double()
    x0, cond, uncond = batch(4, torch.float64)
    t, tt = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    E, mask = cfg_enhanced_target(teacher, x0, t, x0, cond, uncond, ratio=0.5, used_rows_only=used_rows_only)
    assert torch.equal(E, x0) and not mask.any()
    assert [c[1] for c in teacher.calls] == [1, 1]
    if used_rows_only:  # the whole-batch rollout never skips
        acc = rcgm_rollout(teacher, x0, t, tt, x0, order=2, delta_t=0.01, cond=cond,
                           rows=torch.zeros(4, dtype=torch.bool), used_rows_only=True)
        assert [c[1] for c in teacher.calls] == [1, 1, 1, 1] and torch.equal(acc, torch.zeros_like(x0))
    teacher.calls.clear()  # a range no row's t falls in: the same passes, whatever the draw
    cfg_enhanced_target(teacher, x0, torch.full((4,), 0.5, dtype=torch.float64), x0, cond, uncond, ratio=0.5,
                        enhanced_range=(0.6, 0.9), used_rows_only=used_rows_only)
    assert [c[1] for c in teacher.calls] == [1, 1]


@pytest.mark.parametrize("order, used_rows_only", [(2, True), (2, False), (0, True)])
@pytest.mark.parametrize("adversarial", [True, False])
def test_a_step_never_waits_for_the_device(order, used_rows_only, adversarial):
    """The row plan (groups, times, the rows each pass runs on) is made on the host, so a step queues its GPU work
    without reading a device tensor back (`.item()`, a bool-mask index, `nonzero`, `.tolist()`, `.cpu()`) or a copy
    that waits for the device. On the meta device a tensor has no values to read: any such read raises there."""
    student = Net().to("meta")
    teacher = copy.deepcopy(student)
    B = 8
    x0 = torch.randn(B, *SHAPE, device="meta")
    cond, uncond = {"c": torch.randn(B, device="meta")}, {"c": torch.zeros(B, device="meta")}
    groups = assign_groups(B, 0, adversarial=adversarial)
    copies = HostToDeviceCopies()
    with copies:
        loss, logs = twinflow_loss(student, teacher, x0, cond, uncond, groups=groups,
                                   **{**KW, "order": order, "adversarial": adversarial,
                                      "used_rows_only": used_rows_only, "backend": "torch"})
        loss.backward()
    assert loss.device.type == "meta" and all(v.device.type == "meta" for k, v in logs.items()
                                              if isinstance(v, torch.Tensor) and k != "times")
    assert not copies.blocking, copies.blocking
    assert logs["n_adv"] == (2 if adversarial else 0)  # host-known numbers stay numbers


def test_sampled_times_do_not_depend_on_the_data_dtype():
    """bf16 data gets the fp32 times of fp32 data from one seed: times drawn in bf16 would keep ~3 digits, bending the
    time weights and the mul rows' gaps t - tt (at most 0.05 t)."""
    groups = assign_groups(8, 0, adversarial=False)
    x0 = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    model = lambda x, t, tt, cond: (0.5 * x.float() + bc(t - tt, x.float())).to(x.dtype)  # noqa: E731
    # by hand: t, u1, u2 ~ U[0, 1) drawn in float64, in that order; e2e (1, 0), mul tt = t - 0.05 u2 t, any t - u1 t
    g = torch.Generator().manual_seed(4)
    t, u1, u2 = (torch.rand(8, generator=g, dtype=torch.float64) for _ in range(3))
    t = t.clamp(1e-5, 1.0)
    e2e, mul = groups == E2E, groups == MUL
    want_t = torch.where(e2e, 1.0, t)
    want_tt = torch.where(e2e, 0.0, torch.where(mul, t - 0.05 * u2 * t, t - u1 * t))
    for dtype in (torch.bfloat16, torch.float32):
        _, logs = twinflow_loss(model, model, x0.to(dtype), None, None, groups=groups,
                                generator=torch.Generator().manual_seed(4),
                                **{**KW, "order": 1, "enhanced_ratio": 0.0, "adversarial": False, "backend": "torch"})
        got_t, got_tt = logs["times"]
        torch.testing.assert_close(got_t.double(), want_t, rtol=1e-6, atol=0)  # fp32 rounding of the fp64 draws
        torch.testing.assert_close(got_tt.double(), want_tt, rtol=1e-6, atol=1e-7)
        assert got_t.dtype == got_tt.dtype == torch.float32, dtype


def test_clamp_fraction_counts_elements_at_the_clamp():
    """The logged clamp_fraction is the share of RCGM-row elements whose residual |F - T| reached the clamp c (a
    student far off the target: 1; off by 0.75 c, past c/2 but under it: 0), as counted by hand."""
    B, c = 6, 0.4
    g = torch.Generator().manual_seed(2)
    x_star = torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    far = torch.rand(B, *SHAPE, generator=g) < 0.3
    signs = torch.where(torch.rand(B, *SHAPE, generator=g) < 0.5, -1.0, 1.0).double()
    # mul rows only and delta_t above their gap (t - tt <= 0.05 t): cof = (1, 0), R = F - v; data at x*, so the
    # point-mass field (x_t - x*)/t is v and a student F = v + a has R = a exactly (up to fp64 round-off)
    groups = torch.full((B,), MUL)
    for a in (5 * c * signs, 0.75 * c * signs, torch.where(far, 5 * c, 0.75 * c) * signs):
        model = lambda x, t, tt, cond, a=a: (x - x_star) / bc(t.abs(), x) + a  # noqa: E731
        _, logs = twinflow_loss(model, model, x_star.expand(B, *SHAPE).clone(), None, None, groups=groups,
                                **{**KW, "order": 1, "delta_t": 0.06, "clamp": c, "enhanced_ratio": 0.0,
                                   "adversarial": False, "backend": "torch"})
        # by hand: |F - T| = |clamp(R, -c, c)| = min(|a|, c), which is c where |a| = 5c and 0.75c elsewhere
        hand = (a.abs() >= c).double().reshape(B, -1).mean(1).mean().item()  # per-row share, rows' mean
        assert hand in (0.0, 1.0) or 0.1 < hand < 0.9, hand
        assert logs["clamp_fraction"].item() == pytest.approx(hand, abs=1e-12), hand
