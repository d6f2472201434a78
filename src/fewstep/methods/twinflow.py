"""TwinFlow (arXiv:2512.05150): one training step's loss as pure functions over tensors and model callables.

A model is a callable `model(x, t, tt, cond) -> F`: x [B, ...], signed per-sample times t, tt [B] (negative time is
the fake/twin trajectory), `cond` an opaque dict of batch-aligned tensors. F is the any-step average velocity,
x_tt = x_t - (t - tt) F, with x_t = t z + (1 - t) x and v = z - x (z noise, x data).

Batch groups (the reference's four, `fewstep.methods.twinflow_times`): e2e (t=1, tt=0), mul (tt just below t), any
(tt ~ U[0,t]), adv (t = tt < 0 on the model's own one-step samples). Loss = L_base + adversarial_weight*L_adv
+ 0.5*rectify_weight*L_rectify; the elementwise maths (RCGM target, Barron loss) is `fewstep.kernels`.

The row plan (groups, times, which rows each pass runs on) is made on the host and copied to the device without
waiting: choosing rows never reads a device tensor back, so a step queues its GPU work without stalling on the GPU.
"""
from __future__ import annotations

import torch

from fewstep.kernels import rcgm_substep_, rcgm_target_loss
from fewstep.kernels.reference import barron_loss_reference, enhance_target_reference, rcgm_substep_reference_
from fewstep.kernels.reference import rcgm_target_reference

from .rng import capture_rng_state, restore_rng_state
from .transfer import copy_to
from .twinflow_times import ADV, E2E, GROUP_NAMES, MUL, T_MIN, sample_times, time_weight, uniform

RECTIFY_BASE_WEIGHT = 0.5  # the reference's dist_match_cof; L_rectify enters as 0.5 * rectify_weight


# ----------------------------------------------------------------------------------------------------------------------
# small helpers


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def _randn(shape, like: torch.Tensor, generator=None) -> torch.Tensor:
    """Normal noise of `shape` in `like`'s dtype and device, drawn from `generator` (its device) or the global RNG."""
    gdev = like.device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=gdev, dtype=like.dtype).to(like.device)


def _indices(mask: torch.Tensor, device) -> torch.Tensor:
    """The rows of a [B] bool mask as indices on `device`; the mask is read on the host (a device mask: one sync)."""
    return copy_to(mask.cpu().nonzero().squeeze(1), device)


def select_rows(cond, mask: torch.Tensor, batch_size: int | None = None):
    """Rows `mask` of a conditioning object: tensors (dim 0 = batch) are indexed, dicts/lists/tuples recursed,
    other leaves (None, numbers, strings) passed through. A tensor whose dim 0 is not the batch size is an error.
    `mask` is a [B] bool tensor, or row indices with `batch_size` B (indexing by them needs no device sync)."""
    B = mask.shape[0] if batch_size is None else batch_size
    if cond is None or isinstance(cond, (str, int, float, bool)):
        return cond
    if isinstance(cond, torch.Tensor):
        if cond.dim() == 0 or cond.shape[0] != B:
            raise ValueError(f"cond tensor of shape {list(cond.shape)} is not batch-aligned (batch size {B}); every "
                             "tensor in cond must have the batch as dim 0 (keep shared tensors in the model callable)")
        return cond[copy_to(mask, cond.device)]
    if isinstance(cond, dict):
        out = {}
        for k, v in cond.items():
            try:
                out[k] = select_rows(v, mask, B)
            except ValueError as e:
                raise ValueError(f"cond[{k!r}]: {e}") from None
        return out
    if isinstance(cond, (list, tuple)):
        return type(cond)(select_rows(v, mask, B) for v in cond)
    raise TypeError(f"cond: cannot select rows of a {type(cond).__name__}; expected a dict of batch-aligned tensors")


# ----------------------------------------------------------------------------------------------------------------------
# teacher passes (no grad, RNG restored before each call)


def _subset(mask: torch.Tensor, used_rows_only: bool, device) -> tuple[int, tuple | None]:
    """(rows in `mask`, the rows to run the teacher on: (indices on `device`, batch size), or None for all rows).

    `mask` is read on the host (the trainer's is a host tensor: no device sync). With no row in `mask` the passes
    still run, on one row whose output is dropped: ZeRO-3 gathers the weights inside every pass, so a rank whose data
    needs no pass must make it anyway, or the ranks whose data does would wait for it forever."""
    mask = mask.cpu()
    n, B = int(mask.sum()), mask.shape[0]
    if n == 0:
        return 0, (torch.zeros(1, dtype=torch.long, device=device), B)
    if not used_rows_only or n == B:
        return n, None
    return n, (_indices(mask, device), B)


def _rows(a, sub):
    """Rows `sub` (from `_subset`) of a tensor or conditioning object; None means all rows (no copy)."""
    return a if sub is None else select_rows(a, *sub)


def _scatter_rows(rows: torch.Tensor, sub) -> torch.Tensor:
    """A batch-sized tensor holding `rows` at `sub` and zeros elsewhere (the inverse of `_rows`)."""
    if sub is None:
        return rows
    idx, B = sub
    return rows.new_zeros((B, *rows.shape[1:])).index_copy_(0, idx, rows)


@torch.no_grad()
def cfg_enhanced_target(teacher, x_t, t, target, cond, uncond, *, ratio: float, enhanced_range=(0.0, 1.0),
                        adv_mask=None, rng_state=None, used_rows_only: bool = False, frozen_teacher: bool = False):
    """CFG-enhanced flow-matching target. Returns `(E, enhance_mask)`, E detached in fp32 (fp64 for fp64 input).

    Two teacher passes at (x_t, t, t), cond then uncond, RNG restored before each. On rows with t strictly inside
    `enhanced_range` and not adversarial: E = target + ratio*(F_T(cond) - F_T(uncond)); with a `frozen_teacher`
    (EMA decay 1) the base is the teacher's own unconditional field, E = F_T(uncond) + ratio*(F_T(cond) -
    F_T(uncond)), as the reference (inclusionAI/TwinFlow `training_step`: `if self.emd == 1.0`): the student learns
    the frozen teacher's guided field at CFG scale `ratio` (1: its conditional field), not the data velocity plus a
    guidance term (scale 1 + ratio). ratio 0: E = target, no passes.

    `used_rows_only`: the passes run on the enhanced rows alone (the reference runs the whole batch and masks; with the
    default range, e2e rows (t = 1) and adv rows are never enhanced: a third to a half of the batch). The same result
    for a row-independent teacher up to rounding (a sub-batch may take other GEMM kernels; bit-identical here on the
    CPU), and a non-finite output on an unused row no longer reaches E (0 * nan); only a teacher with dropout sees
    other masks on a sub-batch (the trainer turns it off then, so that every pass replays the student's masks).
    A rank with no row to run still makes the passes, on one row (see `_subset`): at a micro-batch of 1 per rank
    nothing is saved. `t` and `adv_mask` may be on the host (the rows are then chosen without a device sync) or on
    x_t's device; the returned mask is on t's.
    """
    lo, hi = enhanced_range
    if not lo < hi:
        raise ValueError(f"cfg_enhanced_target: enhanced_range must be (low, high) with low < high, "
                         f"got {enhanced_range}")
    mask = (t > lo) & (t < hi)
    if adv_mask is not None:
        mask = mask & ~adv_mask.to(mask.device)
    if ratio == 0.0:
        return enhance_target_reference(target), mask
    n, sub = _subset(mask, used_rows_only, x_t.device)
    if uncond is None:
        raise ValueError(f"cfg_enhanced_target: enhanced_ratio={ratio} needs unconditional inputs (uncond is None)")
    rng_state = capture_rng_state(x_t.device) if rng_state is None else rng_state
    x_s, t_s = _rows(x_t, sub), _rows(copy_to(t, x_t.device), sub)
    restore_rng_state(rng_state)
    f_cond = teacher(x_s, t_s, t_s, _rows(cond, sub))
    restore_rng_state(rng_state)
    f_uncond = teacher(x_s, t_s, t_s, _rows(uncond, sub))
    if n == 0:  # the passes ran for the other ranks' sake (see _subset)
        return enhance_target_reference(target), mask
    f_cond, f_uncond = _scatter_rows(f_cond, sub), _scatter_rows(f_uncond, sub)
    on = copy_to(mask, target.device)
    if frozen_teacher:  # the base on the enhanced rows: the teacher's unconditional prediction
        target = torch.where(_bcast(on, target), f_uncond.to(target.dtype), target)
    return enhance_target_reference(target, f_cond, f_uncond, ratio, on), mask


@torch.no_grad()
def rcgm_rollout(teacher, x_t, t, tt, target, *, order: int, delta_t: float, cond=None, rng_state=None,
                 substep=None, rows=None, used_rows_only: bool = False) -> torch.Tensor:
    """RCGM teacher rollout: the integral I = sum_k (s_k - s_{k+1}) G_k, fp32 (fp64 for fp64 input), [B, ...].

    Pre-step along the target, x_0 = x_t - (t - t_m)*target with t_m = max(t - delta_t, tt), then `order` equal
    sub-steps s_k = t_m + (tt - t_m)*k/N, G_k = teacher(x_k, s_k, s_{k+1}, cond) with the RNG restored before each
    call, x_{k+1} = x_k - (s_k - s_{k+1}) G_k. Rows with t - tt <= delta_t have t_m = tt: zero-length steps, I = 0.
    `substep(x, acc, G, s_k, s_k1)` defaults to the torch reference (the trainer passes the kernel dispatcher).

    `t`, `tt` and `rows` may be on the host (the rows are then chosen without a device sync) or on x_t's device.
    `used_rows_only`: the teacher runs only on rows with a non-zero-length rollout that are in `rows` (a [B] bool
    mask of the rows whose I is used; None: all); I is 0 on the others: adv rows and rows whose gap t - tt is at
    most delta_t (about half the mul rows at delta_t 0.01), 19% of the rows without the adversarial branch, 39% with
    it. See `cfg_enhanced_target`.
    """
    if not isinstance(order, int) or order < 0:
        raise ValueError(f"rcgm: order (twinflow_estimate_order) must be an int >= 0, got {order!r}")
    if not delta_t > 0:
        raise ValueError(f"rcgm: delta_t (twinflow_delta_t) must be > 0, got {delta_t}")
    cd = torch.float64 if torch.float64 in (x_t.dtype, target.dtype) else torch.float32
    acc = torch.zeros(x_t.shape, dtype=cd, device=x_t.device)
    if order == 0:
        return acc
    substep = rcgm_substep_reference_ if substep is None else substep
    rng_state = capture_rng_state(x_t.device) if rng_state is None else rng_state
    # The time grid is float64 so that t - t_m is delta_t to ~1e-16 (the cof_l, cof_r scaling divides by delta_t);
    # the teacher sees the times in t's dtype.
    t64, tt64 = t.double(), tt.double()
    t_m = torch.maximum(t64 - delta_t, tt64)
    n, sub = -1, None
    if used_rows_only:
        live = t_m > tt64 if rows is None else (t_m > tt64) & rows.to(t_m.device)
        n, sub = _subset(live, True, x_t.device)
    t64, tt64, t_m = (_rows(copy_to(a, x_t.device), sub) for a in (t64, tt64, t_m))
    x_s = _rows(x_t, sub)
    cond, acc_s = _rows(cond, sub), _rows(acc, sub)
    x = x_s.to(cd) - _bcast((t64 - t_m).to(cd), x_s) * _rows(target, sub).to(cd)
    for k in range(order):
        s_k = t_m + (tt64 - t_m) * (k / order)
        s_k1 = tt64 if k == order - 1 else t_m + (tt64 - t_m) * ((k + 1) / order)
        restore_rng_state(rng_state)
        G = teacher(x.to(x_t.dtype), s_k.to(t.dtype), s_k1.to(t.dtype), cond)
        substep(x, acc_s, G, s_k, s_k1)
    return acc if n == 0 else _scatter_rows(acc_s, sub)  # n == 0: the passes ran for the other ranks' sake


@torch.no_grad()
def rcgm_target(teacher, x_t, t, tt, target, F_student, *, order: int, delta_t: float, clamp: float, cond=None,
                rng_state=None, rcgm_mask=None, substep=None, used_rows_only: bool = False) -> torch.Tensor:
    """RCGM target T = sg(F) - clamp(cof_l*F - cof_r*I - target, +-clamp) with I = `rcgm_rollout(...)`.

    cof = ((t-tt)/delta_t, 1/delta_t) where t - tt >= delta_t, else (1, 0); rows with `rcgm_mask` False get T = target.
    For a straight flow (F = teacher = v) T = v for every order. Order 0 has no rollout (I = 0) and, as the
    reference's estimate_order 0, no consistency target: T = target on every row (plain flow matching).
    The unfused form of the target, for tests and reading: training computes T with the loss in one fused pass
    (`rcgm_target_loss`, in `twinflow_loss`).
    """
    acc = rcgm_rollout(teacher, x_t, t, tt, target, order=order, delta_t=delta_t, cond=cond, rng_state=rng_state,
                       substep=substep, rows=rcgm_mask, used_rows_only=used_rows_only)
    if order == 0:
        rcgm_mask = torch.zeros(t.shape, dtype=torch.bool)
    dev = F_student.device
    return rcgm_target_reference(F_student, acc, target, copy_to(t, dev), copy_to(tt, dev), delta_t=delta_t,
                                 clamp=clamp, rcgm_mask=None if rcgm_mask is None else copy_to(rcgm_mask, dev))


# ----------------------------------------------------------------------------------------------------------------------
# self-adversarial parts (current model, no RNG restore)


@torch.no_grad()
def fake_samples(model, z, cond) -> torch.Tensor:
    """One-step samples x_fake = sg(z - F(z, 1, 0)) from the current model."""
    one = torch.ones(z.shape[0], device=z.device, dtype=torch.promote_types(z.dtype, torch.float32))
    return (z - model(z, one, torch.zeros_like(one), cond).to(z.dtype)).detach()


def rectify_loss(model, x_hat, F_e2e, cond, generator=None, max_rows: int | None = None,
                 rows: float | None = None) -> torch.Tensor:
    """L_rectify (DMD-style, no discriminator): scalar mean over rows of Barron(F_e2e, sg(F_e2e - F_grad)), or their
    sum / `rows` where given (`twinflow_times.rectify_rows`).

    Fresh z', t' ~ U(0,1); x~ = t' z' + (1 - t') sg(x_hat); F_grad = clamp(F(x~, -t', -t') - F(x~, t', t'), +-1) in
    fp32, no grad. Its gradient moves the one-step output along the gap between the fake (-t) and real (+t) fields.
    Both fields come from one pass over the rows twice (fake then real; under ZeRO-3 one gather of the weights) where
    that is at most `max_rows` rows (the micro-batch, whose no-grad pass the memory plan counts; None: no limit), else
    from two passes.
    """
    n, x_hat = x_hat.shape[0], x_hat.detach()
    t = uniform(n, x_hat.device, torch.promote_types(x_hat.dtype, torch.float32), generator).clamp_(T_MIN, 1.0)
    z = _randn(x_hat.shape, x_hat, generator)
    tb = _bcast(t, x_hat).to(x_hat.dtype)
    x_tilde = tb * z + (1 - tb) * x_hat
    cd = torch.promote_types(F_e2e.dtype, torch.float32)  # fp32 for bf16/fp32 models (fp64 stays fp64)
    with torch.no_grad():
        if max_rows is None or 2 * n <= max_rows:
            twice = torch.arange(n).repeat(2)  # on the host: the rows' index, twice
            signed = torch.cat([-t, t])
            fake, real = model(torch.cat([x_tilde, x_tilde]), signed, signed, select_rows(cond, twice, n)).split(n)
        else:
            fake, real = model(x_tilde, -t, -t, cond), model(x_tilde, t, t, cond)
        F_grad = (fake.to(cd) - real.to(cd)).clamp(-1.0, 1.0)
    per_row = barron_loss_reference(F_e2e, F_e2e.detach().to(cd) - F_grad)
    return per_row.mean() if rows is None else per_row.sum() / rows


# ----------------------------------------------------------------------------------------------------------------------
# one training step


def twinflow_loss(student, teacher, x0, cond, uncond, *, groups, order: int = 2, delta_t: float = 0.01,
                  clamp: float = 1.0, enhanced_ratio: float = 0.5, enhanced_range=(0.0, 1.0), adversarial: bool = True,
                  adversarial_weight: float = 1.0, rectify_weight: float = 1.0, frozen_teacher: bool = False,
                  rectify_rows: float | None = None, generator=None, backend: str = "auto",
                  used_rows_only: bool = False):
    """One TwinFlow step's loss in the reference order. Returns `(loss, logs)`; loss is a scalar with one graph, logs
    the logged terms: 0-d tensors on the device where computed there (read them after backward: reading one waits for
    the GPU), floats where known on the host (group sizes), and "times", the rows' signed (t, tt) on the host.

    1. times from `groups`; adv rows' data := fake samples of the student (no grad, fresh noise); fresh z; x_t with |t|.
    2. capture the RNG, student pass F = student(x_t, t, tt, cond) with grad (the only graph); capture the RNG again.
    3. the teacher passes, each with the RNG restored to the pre-student state (same dropout masks as the student
       pass): CFG-enhanced target E, RCGM rollout. (The reference updates an EMA teacher between the student pass and
       these; fewstep's trainer updates it after every applied optimizer step instead: the same weights.) With
       `frozen_teacher` (EMA decay 1) E's base is the teacher's unconditional field and the rollout uses the student
       under no grad, as the reference. The RNG is
       then put back to its post-student state, so the global stream advances as if the teacher passes drew nothing.
       `used_rows_only` runs each teacher pass on the rows whose output is used (see `cfg_enhanced_target`,
       `rcgm_rollout`); for a model without dropout the loss is the same up to rounding.
    4. per-row loss = Barron(F, T) * time_weight (the fused `rcgm_target_loss`); L_base = non-adv rows, L_adv = adv
       rows, both summed over the counted rows / their number (all rows; order 0: mul and adv rows only).
    5. L_rectify on e2e rows (adversarial only): their mean, or their sum / `rectify_rows` (a batch smaller than the
       groups' cycle: `twinflow_times.rectify_rows`). loss = L_base + adversarial_weight*L_adv +
       0.5*rectify_weight*L_rect.
    """
    B = x0.shape[0]
    if not isinstance(order, int) or order < 0:
        raise ValueError(f"twinflow_loss: order (twinflow_estimate_order) must be an int >= 0, got {order!r}")
    if not delta_t > 0 or not clamp > 0:
        raise ValueError(f"twinflow_loss: delta_t and clamp (twinflow_delta_t, twinflow_target_clamp) must be > 0, "
                         f"got delta_t={delta_t}, clamp={clamp}")
    if groups.shape != (B,):
        raise ValueError(f"twinflow_loss: groups must have shape [{B}] (one id per row), got {list(groups.shape)}")
    for name, c in (("cond", cond), ("uncond", uncond)):  # every pass selects rows of them: check them once, here
        try:
            select_rows(c, torch.zeros(0, dtype=torch.long, device=x0.device), B)
        except ValueError as e:
            raise ValueError(f"twinflow_loss: {name}: {e}") from None
    # The row plan, on the host: groups, times and masks (the trainer's groups are a host tensor already).
    groups, dev = groups.cpu(), x0.device
    counts = torch.bincount(groups, minlength=4).tolist()
    if not adversarial and counts[ADV] > 0:
        raise ValueError("twinflow_loss: groups contain adversarial rows but adversarial=False "
                         "(build them with assign_groups(..., adversarial=False))")
    wd = torch.promote_types(x0.dtype, torch.float32)  # work dtype for noise, targets and times
    t_host, tt_host = sample_times(groups, generator, dtype=wd)
    host_masks = {name: groups == g for g, name in enumerate(GROUP_NAMES)}
    t, tt = copy_to(t_host, dev), copy_to(tt_host, dev)
    adv, mul = copy_to(host_masks["adv"], dev), copy_to(host_masks["mul"], dev)

    x = x0.detach().to(wd)
    if counts[ADV] > 0:
        adv_rows = _indices(host_masks["adv"], dev)
        noise = _randn((counts[ADV], *x.shape[1:]), x, generator)
        x = x.index_copy(0, adv_rows, fake_samples(student, noise, select_rows(cond, adv_rows, B)).to(wd))
    z = _randn(x.shape, x, generator)
    ta = _bcast(t.abs(), x)
    x_t = (ta * z + (1 - ta) * x).to(x0.dtype)
    v = z - x

    rng_state = capture_rng_state(x0.device)
    F = student(x_t, t, tt, cond)
    after_student = capture_rng_state(x0.device)
    E, enh_mask = cfg_enhanced_target(teacher, x_t, t_host, v, cond, uncond, ratio=enhanced_ratio,
                                      enhanced_range=enhanced_range, adv_mask=host_masks["adv"], rng_state=rng_state,
                                      used_rows_only=used_rows_only, frozen_teacher=frozen_teacher)
    if order >= 1:
        rcgm_model = student if frozen_teacher else teacher
        substep = lambda *a: rcgm_substep_(*a, backend=backend)  # noqa: E731
        acc = rcgm_rollout(rcgm_model, x_t, t_host, tt_host, E, order=order, delta_t=delta_t, cond=cond,
                           rng_state=rng_state, substep=substep, rows=~host_masks["adv"],
                           used_rows_only=used_rows_only)
        rcgm_mask, counted = ~adv, torch.ones_like(adv)
    else:  # order 0: no consistency target; only mul (plain flow matching) and adv rows count, as the reference
        acc, rcgm_mask, counted = None, torch.zeros_like(adv), mul | adv
    restore_rng_state(after_student)

    w = time_weight(t, tt, adv)
    rows, T = rcgm_target_loss(F, acc, E, t, tt, delta_t=delta_t, clamp=clamp, rcgm_mask=rcgm_mask, sample_weight=w,
                               backend=backend)
    n = max(B if order >= 1 else counts[MUL] + counts[ADV], 1)
    zero = F.sum() * 0.0  # keeps the graph when a micro-step has no counted rows
    l_base = torch.where(counted & ~adv, rows, 0.0).sum() / n + zero
    l_adv = torch.where(adv, rows, 0.0).sum() / n + zero
    loss = l_base + adversarial_weight * l_adv

    l_rect = zero
    if adversarial and counts[E2E] > 0:
        e2e_rows = _indices(host_masks["e2e"], dev)
        x_hat = (x_t.to(wd) - ta * F.detach().to(wd)).index_select(0, e2e_rows)  # x_t - |t| F: the one-step output
        l_rect = rectify_loss(student, x_hat.to(x0.dtype), F.index_select(0, e2e_rows),
                              select_rows(cond, e2e_rows, B), generator, max_rows=B, rows=rectify_rows)
        loss = loss + RECTIFY_BASE_WEIGHT * rectify_weight * l_rect

    with torch.no_grad():  # device scalars: the caller reads them with the loss, in one copy, after backward
        resid = (F.detach().to(T.dtype) - T).abs().reshape(B, -1)  # |clamp(R)| on RCGM rows
        rc = rcgm_mask.to(wd)
        n_rc = rc.sum().clamp_min(1)
        stats = torch.stack([loss.detach().to(wd), l_base.detach().to(wd), l_adv.detach().to(wd),
                             l_rect.detach().to(wd), (resid.mean(1).to(wd) * rc).sum() / n_rc,
                             ((resid >= clamp * (1 - 1e-6)).to(wd).mean(1) * rc).sum() / n_rc, w.mean().to(wd)])
    keys = ("loss", "l_base", "l_adv", "l_rectify", "mean_abs_clamped_residual", "clamp_fraction", "mean_time_weight")
    logs = dict(zip(keys, stats.unbind()))
    logs["n_enhanced"] = float(enh_mask.sum())  # host mask
    logs.update({f"n_{name}": float(c) for name, c in zip(GROUP_NAMES, counts)})
    logs["times"] = (t_host, tt_host)  # signed (t, tt) of each row, for the trajectory plot
    return loss, logs
