"""RCGM kernels vs the torch references: sub-step, fused target + Barron loss (forward and backward)."""
import pytest
import torch
from kernel_helpers import DEVICE, rel_err

from fewstep.kernels import rcgm_substep_, rcgm_target_loss
from fewstep.kernels.reference import (
    bcast,
    rcgm_coefficients_reference,
    rcgm_substep_reference_,
    rcgm_target_loss_reference,
)

DELTA, CLAMP = 0.01, 1.0


def make_case(B, trailing, dtype, seed, *, with_acc=True):
    """Random inputs covering every row kind, cycling over the batch (`target` stands for the CFG-enhanced target E,
    which training computes before the rollout and passes in):
    0: e2e (t=1, tt=0); 1: d < delta; 2: t == tt; 3: any tt in [0, t]; 4: adversarial (rcgm_mask False, -t, -t).
    acc is NaN on rows that must never read it (d < delta, adversarial)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, *trailing)
    rnd = lambda: torch.randn(shape, generator=g)  # noqa: E731
    t = 0.1 + 0.9 * torch.rand(B, generator=g)
    tt = t * torch.rand(B, generator=g)
    kind = torch.arange(B) % 5
    t[kind == 0], tt[kind == 0] = 1.0, 0.0
    tt[kind == 1] = t[kind == 1] - 0.5 * DELTA
    tt[kind == 2] = t[kind == 2]
    t[kind == 4] = -t[kind == 4]
    tt[kind == 4] = t[kind == 4]
    d = t - tt
    target = rnd()
    # acc ~ the teacher integral over (t - delta -> tt): close to (d - delta)*target, so R is O(1..100)
    acc = bcast(d - DELTA, target) * (target + 0.1 * rnd())
    rcgm_mask = kind != 4
    acc[~((d >= DELTA) & rcgm_mask)] = float("nan")
    kw = dict(delta_t=DELTA, clamp=CLAMP, rcgm_mask=rcgm_mask, sample_weight=1.0 + 3.0 * torch.rand(B, generator=g))
    to = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
    F = rnd().to(dtype).to(DEVICE)
    return F, (to(acc) if with_acc else None), to(target), to(t), to(tt), {k: to(v) for k, v in kw.items()}


def run_both(F, acc, target, t, tt, kw, block, grad_seed=1):
    """(loss, T, dF) from the reference (autograd) and from the Triton path."""
    out = []
    for backend in ("torch", "triton"):
        Fl = F.detach().clone().requires_grad_(True)
        if backend == "torch":
            loss, T = rcgm_target_loss_reference(Fl, acc, target, t, tt, **kw)
        else:
            from fewstep.kernels.rcgm import rcgm_target_loss_triton
            loss, T = rcgm_target_loss_triton(Fl, acc, target, t, tt, BLOCK=block, **kw)
        g = torch.rand(F.shape[0], generator=torch.Generator().manual_seed(grad_seed)).to(F.device) + 0.5
        loss.backward(g)
        out.append((loss.detach(), T, Fl.grad))
    return out


CASES = [  # (B, trailing shape, BLOCK): sizes that are not multiples of BLOCK, one element per row, one element
    (5, (3, 17, 19), 256),
    (10, (1000,), 256),
    (5, (1,), 1024),
    (1, (1,), 1024),
    (5, (2, 33, 65), 65536),
]


@pytest.mark.parametrize("B,trailing,block", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_loss_matches_reference(poison, B, trailing, block, dtype):
    F, acc, target, t, tt, kw = make_case(B, trailing, dtype, seed=B * 7 + len(trailing))
    (l_ref, T_ref, g_ref), (l_k, T_k, g_k) = run_both(F, acc, target, t, tt, kw, block)
    assert T_k.dtype == torch.float32 and T_k.shape == F.shape and not T_k.requires_grad
    assert torch.isfinite(l_k).all() and torch.isfinite(T_k).all() and torch.isfinite(g_k).all()
    assert rel_err(T_k, T_ref) <= 1e-6
    assert rel_err(l_k, l_ref) <= 1e-5
    assert g_k.dtype == F.dtype
    assert rel_err(g_k, g_ref) <= (1e-5 if dtype == torch.float32 else 8e-3)
    # adversarial rows: T is the target E exactly
    adv = ~kw["rcgm_mask"]
    assert torch.equal(T_k[adv], target[adv])


def test_cases_exercise_both_branches_and_the_clamp():
    """Guard for the parity test: its data must really hit d >= delta, d < delta, t == tt, clamped and free R."""
    F, acc, target, t, tt, kw = make_case(5, (3, 17, 19), torch.float32, seed=5 * 7 + 3)
    cof_l, cof_r = rcgm_coefficients_reference(t, tt, DELTA)
    assert (cof_r > 0).any() and (cof_r == 0).any() and (t == tt).any()
    keep = kw["rcgm_mask"] & (cof_r > 0)
    R = bcast(cof_l, F) * F - bcast(cof_r, F) * torch.nan_to_num(acc) - target  # target: E
    clamped = R[kw["rcgm_mask"]].abs() > CLAMP
    assert clamped.any() and (~clamped).any()
    assert (R[keep].abs() <= CLAMP).any()  # the rollout branch also has unclamped elements


def test_a_nan_rollout_makes_its_rows_loss_nan_in_both_backends(poison):
    """A NaN in a row's teacher rollout (a diverged teacher) must make that row's loss NaN, so the step is skipped.
    The kernel's clamp once returned the other operand for NaN (Triton's default min/max), giving that row the
    finite target F -/+ clamp, while torch's clamp kept the NaN."""
    F, acc, target, t, tt, kw = make_case(5, (3, 17, 19), torch.float32, seed=11)
    row = 3  # kind 3: any tt, reads the rollout
    assert kw["rcgm_mask"][row] and (t - tt)[row] >= DELTA
    acc[row].view(-1)[100] = float("nan")
    (l_ref, _, _), (l_k, _, _) = run_both(F, acc, target, t, tt, kw, 256)
    others = torch.arange(5, device=l_k.device) != row
    assert torch.isnan(l_ref[row]) and torch.isnan(l_k[row])
    assert torch.isfinite(l_k[others]).all() and rel_err(l_k[others], l_ref[others]) <= 1e-5


def test_target_loss_without_acc(poison):
    """acc=None (no teacher rollout) equals an explicit all-zero rollout in the reference."""
    F, _, target, t, tt, kw = make_case(5, (7, 9), torch.float32, seed=3, with_acc=False)
    (l_ref, T_ref, g_ref), (l_k, T_k, g_k) = run_both(F, None, target, t, tt, kw, 64)
    assert rel_err(T_k, T_ref) <= 1e-6 and rel_err(l_k, l_ref) <= 1e-5 and rel_err(g_k, g_ref) <= 1e-5
    l_zero, _ = rcgm_target_loss_reference(F, torch.zeros_like(F), target, t, tt, **kw)
    assert rel_err(l_k, l_zero) <= 1e-5


def test_gradcheck_float64_through_triton():
    """gradcheck of the Triton forward/backward in float64.

    The op's gradient treats T and the Barron weight w as constants (they are detached by definition), so finite
    differences agree with it only where those are constant in F: adversarial rows (T = E) and a Barron scale c large
    enough that w = 1 - O(m/c^2) (relative effect ~1e-6, far below gradcheck's rtol). sample_weight = c keeps the
    gradient O(1), well above gradcheck's atol.
    """
    g = torch.Generator().manual_seed(0)
    B, shape = 3, (3, 4)
    F = torch.randn(B, *shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    target = torch.randn(B, *shape, generator=g, dtype=torch.float64).to(DEVICE)
    t = torch.tensor([-0.3, -0.7, -1.0], dtype=torch.float64, device=DEVICE)
    c = 1e3
    kw = dict(delta_t=DELTA, clamp=CLAMP, rcgm_mask=torch.zeros(B, dtype=torch.bool, device=DEVICE), barron_c=c,
              sample_weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, device=DEVICE) * c)
    fn = lambda F_: rcgm_target_loss(F_, None, target, t, t, backend="triton", **kw)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (F,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_float64_matches_reference():
    F, acc, target, t, tt, kw = make_case(5, (4, 6), torch.float64, seed=11)
    kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    (l_ref, T_ref, g_ref), (l_k, T_k, g_k) = run_both(F, acc.double(), target.double(), t.double(), tt.double(), kw, 16)
    assert T_k.dtype == torch.float64
    assert rel_err(T_k, T_ref) <= 1e-12 and rel_err(l_k, l_ref) <= 1e-12 and rel_err(g_k, g_ref) <= 1e-12


def test_straight_flow_is_self_consistent():
    """Constant velocity v for student and teacher: N Triton sub-steps then the Triton target give T = v, loss ~ 0."""
    g = torch.Generator().manual_seed(4)
    B, N = 4, 2
    v = torch.randn(B, 2, 5, 7, generator=g, dtype=torch.float64).to(DEVICE)
    x = torch.randn(B, 2, 5, 7, generator=g, dtype=torch.float64).to(DEVICE)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3], dtype=torch.float64, device=DEVICE)
    tt = torch.tensor([0.0, 0.35, 0.495, 0.3], dtype=torch.float64, device=DEVICE)  # last two: d < delta
    t_m = torch.maximum(t - DELTA, tt)
    x = x - bcast(t - t_m, x) * v  # pre-step along the target
    acc = torch.zeros_like(x)
    for k in range(N):
        s0, s1 = t_m + (tt - t_m) * k / N, t_m + (tt - t_m) * (k + 1) / N
        rcgm_substep_(x, acc, v, s0, s1, backend="triton")
    loss, T = rcgm_target_loss(v, acc, v, t, tt, delta_t=DELTA, clamp=CLAMP, backend="triton")
    assert rel_err(T, v) <= 1e-10
    assert loss.abs().max().item() <= 1e-12


@pytest.mark.parametrize("x_dtype,f_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("B,trailing,block", [(3, (5, 77), 128), (4, (1,), 1024), (2, (3, 100, 101), 65536)])
def test_substep_matches_reference(x_dtype, f_dtype, B, trailing, block):
    """In-place sub-step; x and acc are inner rows of buffers with guard rows, so stray writes would be caught."""
    from fewstep.kernels.rcgm import rcgm_substep_triton_

    g = torch.Generator().manual_seed(B + len(trailing))
    shape = (B, *trailing)
    guard = -7777.0  # finite: a stray update would change it
    bufs = [torch.full((B + 2, *trailing), guard) for _ in range(2)]
    x0, a0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    F = torch.randn(shape, generator=g).to(f_dtype).to(DEVICE)
    t_cur, t_next = torch.rand(B, generator=g).to(DEVICE) + 0.5, torch.rand(B, generator=g).to(DEVICE)
    bx, ba = (b.to(x_dtype).to(DEVICE) for b in bufs)
    x, acc = bx[1:B + 1], ba[1:B + 1]
    x.copy_(x0), acc.copy_(a0)
    xr, ar = x.clone(), acc.clone()
    rcgm_substep_reference_(xr, ar, F, t_cur, t_next)
    rcgm_substep_triton_(x, acc, F, t_cur, t_next, BLOCK=block)
    tol = 1e-6 if x_dtype == torch.float32 else 4e-3
    assert rel_err(x, xr) <= tol and rel_err(acc, ar) <= tol
    assert rel_err(x, x0.to(x_dtype)) > 1e-3  # the update really moved x
    for b in (bx, ba):
        assert (b[0] == guard).all() and (b[B + 1] == guard).all()


def test_substep_scalar_times():
    g = torch.Generator().manual_seed(2)
    x, acc, F = (torch.randn(3, 50, generator=g).to(DEVICE) for _ in range(3))
    xr, ar = x.clone(), acc.clone()
    rcgm_substep_(x, acc, F, 0.75, 0.25, backend="triton")
    xr -= 0.5 * F
    ar += 0.5 * F
    assert rel_err(x, xr) <= 1e-6 and rel_err(acc, ar) <= 1e-6


def test_bad_inputs_are_rejected():
    F = torch.randn(3, 4, device=DEVICE)
    t = torch.rand(3, device=DEVICE)
    with pytest.raises(ValueError, match="target has shape"):
        rcgm_target_loss(F, None, torch.randn(3, 5, device=DEVICE), t, t, delta_t=DELTA, clamp=1.0, backend="triton")
    with pytest.raises(ValueError, match=r"tt: expected shape \[3\]"):
        rcgm_target_loss(F, None, F, t, t[:2], delta_t=DELTA, clamp=1.0, backend="triton")
    with pytest.raises(ValueError, match="delta_t must be a number > 0, got 0.0"):
        rcgm_target_loss(F, None, F, t, t, delta_t=0.0, clamp=1.0, backend="triton")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="clamp must be a number >= 0, got None"):
            rcgm_target_loss(F, None, F, t, t, delta_t=DELTA, clamp=None, backend=backend)
        with pytest.raises(ValueError, match="barron_c must be a number > 0, got 0.0"):
            rcgm_target_loss(F, None, F, t, t, delta_t=DELTA, clamp=1.0, barron_c=0.0, backend=backend)
    with pytest.raises(ValueError, match="x must be contiguous"):
        rcgm_substep_(torch.randn(4, 3, device=DEVICE).t(), F.clone(), F, t, t, backend="triton")
    with pytest.raises(ValueError, match="acc has shape"):
        rcgm_substep_(F.clone(), torch.randn(3, 5, device=DEVICE), F, t, t, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_barron_loss_is_the_reference_implementations(backend):
    """TwinFlow's `barron_reweighting_loss` (alpha = 1), written out here: mse / c * (mse / (c^2 + 1e-8) + 1)^-1/2.
    Residuals of order 1 (far above c = 1e-3), where its 1e-8 moves the loss by 0.5%, checked to 1e-10."""
    g = torch.Generator().manual_seed(5)
    B, c = 6, 1e-3
    F = torch.randn(B, 3, 5, 7, generator=g, dtype=torch.float64).to(DEVICE)
    E = torch.randn(B, 3, 5, 7, generator=g, dtype=torch.float64).to(DEVICE)
    t = torch.rand(B, generator=g, dtype=torch.float64).to(DEVICE)
    keep_none = torch.zeros(B, dtype=torch.bool, device=DEVICE)  # T = E on every row
    loss, _ = rcgm_target_loss(F, None, E, t, t, delta_t=DELTA, clamp=CLAMP, rcgm_mask=keep_none, barron_c=c,
                               backend=backend)
    mse = (F - E).square().flatten(1).mean(1)
    expected = mse * (mse / (c ** 2 + 1e-8) + 1.0) ** -0.5 / c
    assert rel_err(loss, expected) <= 1e-10
