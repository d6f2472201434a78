"""TwinFlow's batch groups and their times, as pure functions (see `fewstep.methods.twinflow` for the loss).

Each row of a batch belongs to one of four groups (the reference's): e2e (t = 1, tt = 0: the one-step map), mul
(tt just below t), any (tt ~ U[0, t]) and adv (t = tt < 0: the model's own samples on the twin trajectory).
`assign_groups` splits a batch (or cycles the groups over micro-steps for batches smaller than the cycle),
`sample_times` draws their signed (t, tt), `time_weight` weighs their loss.
"""
from __future__ import annotations

import math

import torch

E2E, MUL, ANY, ADV = 0, 1, 2, 3
GROUP_NAMES = ("e2e", "mul", "any", "adv")
MUL_GAP = 0.05  # mul rows: tt = t - u * t * 0.05
T_MIN = 1e-5  # sampled times are kept >= this so the sign of an adversarial time (-t) is never lost to -0.0


def uniform(n: int, device, dtype, generator=None) -> torch.Tensor:
    """U[0,1) samples of shape [n]; drawn on the generator's device (global RNG when None), then moved."""
    gdev = device if generator is None else generator.device
    return torch.rand(n, generator=generator, device=gdev, dtype=torch.float64).to(device=device, dtype=dtype)


def _group_sizes(batch_size: int, k: int) -> list[int]:
    # The reference: round(B/k) rows for each group but the last, which absorbs the rounding. Its rounding leaves the
    # last group empty at B = 6 (2, 2, 2, 0); there we fall back to floor(B/k) so every group has a row.
    lens = [int(round(batch_size / k))] * (k - 1)
    if batch_size - sum(lens) < 1:
        lens = [batch_size // k] * (k - 1)
    return lens + [batch_size - sum(lens)]


def assign_groups(batch_size: int, micro_step: int = 0, *, adversarial: bool = True, device=None,
                  weights=None) -> torch.Tensor:
    """Group id per row (E2E=0, MUL=1, ANY=2, ADV=3) as a LongTensor [B].

    With K groups (4, or 3 = e2e/mul/any when `adversarial` is False: no ADV share, equal thirds), B >= K gives K
    contiguous groups as the reference (last absorbs the rounding); B < K cycles the groups over gradient-accumulation
    micro-steps: row i of micro-step k is group (k*B + i) % K, so every group appears equally over K micro-steps.

    weights: positive integer shares (e2e, mul, any, adv; adv ignored without `adversarial`). Equal weights are the
    reference split above. Otherwise the cycle is the pattern of w_g copies of each group g (length P = sum w): B >= P
    gives contiguous groups sized by largest remainder of B * w_g / P, B < P cycles the pattern over micro-steps.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"assign_groups: batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(micro_step, int) or micro_step < 0:
        raise ValueError(f"assign_groups: micro_step must be an int >= 0, got {micro_step!r}")
    k, w = _group_weights(adversarial, weights)
    if len(set(w)) > 1:
        return _weighted_groups(batch_size, micro_step, w, device)
    if batch_size < k:
        return (micro_step * batch_size + torch.arange(batch_size, device=device)) % k
    sizes = torch.tensor(_group_sizes(batch_size, k), device=device)
    return torch.repeat_interleave(torch.arange(k, device=device), sizes)


def _group_weights(adversarial: bool, weights) -> tuple[int, list[int]]:
    """(number of groups K, their integer shares) for `assign_groups`: adv's share is dropped without `adversarial`."""
    k = 4 if adversarial else 3
    w = [1] * k if weights is None else [int(x) for x in list(weights)[:k]]
    if len(w) != k or any(x < 1 for x in w) or any(x != y for x, y in zip(w, list(weights or w)[:k])):
        raise ValueError(f"assign_groups: weights must be {k} positive integers (e2e, mul, any, adv), got {weights!r}")
    return k, w


def steps_for_every_group(batch_size: int, *, adversarial: bool = True, weights=None) -> int:
    """The gradient-accumulation steps an optimizer step needs for `assign_groups`' cycle to give it every group
    (rows of each rank): 1 for a batch of the cycle's length or more, else ceil(length / batch). The cycle runs over
    micro-steps, the same on every rank (every rank makes the same passes: ZeRO-3 forwards are collective, and a
    rank with more passes, e.g. L_rectify's, would hold the others back at each step)."""
    length = _cycle_length(_group_weights(adversarial, weights)[1])
    return 1 if batch_size >= length else -(-length // batch_size)


def _cycle_length(w: list[int]) -> int:
    """Rows in one cycle of the groups: equal shares cycle the K groups, others their pattern of sum(w) rows."""
    return len(w) if len(set(w)) == 1 else sum(w)


def rectify_rows(batch_size: int, *, weights=None) -> float | None:
    """What L_rectify's sum over a micro-step's e2e rows is divided by: None (their number: the reference's mean) for
    a batch that holds the whole cycle of groups; for a smaller one, whose groups cycle over micro-steps, the e2e rows
    a micro-step has on average (batch x e2e share). Then gradient accumulation over the cycle weighs L_rectify
    against L_base and L_adv (sums over rows / batch) as one batch of all those rows does, which a mean over the one
    e2e row of a micro-step would not (at batch 1: a quarter of it)."""
    w = _group_weights(True, weights)[1]
    return None if batch_size >= _cycle_length(w) else batch_size * w[E2E] / sum(w)


def _weighted_groups(batch_size: int, micro_step: int, w: list[int], device) -> torch.Tensor:
    pattern = torch.repeat_interleave(torch.arange(len(w)), torch.tensor(w))
    p = len(pattern)
    if batch_size < p:
        return pattern[(micro_step * batch_size + torch.arange(batch_size)) % p].to(device)
    exact = [batch_size * x / p for x in w]
    sizes = [int(math.floor(e)) for e in exact]
    for g in sorted(range(len(w)), key=lambda g: sizes[g] - exact[g])[:batch_size - sum(sizes)]:
        sizes[g] += 1  # largest remainders first
    return torch.repeat_interleave(torch.arange(len(w)), torch.tensor(sizes)).to(device)


def sample_times(groups: torch.Tensor, generator=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed per-row times (t, tt) for the groups: t ~ U(0,1) (= Beta(1,1)), then e2e (1, 0); mul (t, t - u2*t*0.05);
    any (t, t - u1*t); adv (-t, -t). Draws t, u1, u2 in that order from `generator` (global RNG when None)."""
    if groups.dim() != 1 or groups.dtype != torch.long:
        raise ValueError(f"sample_times: groups must be a LongTensor [B], got {groups.dtype} {list(groups.shape)}")
    if ((groups < 0) | (groups > ADV)).any():
        raise ValueError(f"sample_times: group ids must be in 0..3 (e2e, mul, any, adv), got {groups.tolist()}")
    B, dev = groups.shape[0], groups.device
    t = uniform(B, dev, dtype, generator).clamp_(T_MIN, 1.0)
    u1, u2 = uniform(B, dev, dtype, generator), uniform(B, dev, dtype, generator)
    tt_any = t - u1 * t
    tt_mul = t - u2 * t * MUL_GAP
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    t_out = torch.where(groups == E2E, one, torch.where(groups == ADV, -t, t))
    tt_out = torch.where(groups == E2E, zero, torch.where(groups == MUL, tt_mul,
                                                          torch.where(groups == ANY, tt_any, -t)))
    return t_out, tt_out


def time_weight(t: torch.Tensor, tt: torch.Tensor, adv_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row loss weight w = tan((1 - (|t| - |tt|)) * pi/2.5) + 1 (1 at |t|-|tt| = 1, ~4.08 at tt = t); 1 on adv."""
    w = torch.tan((1.0 - (t.abs() - tt.abs())) * (math.pi / 2.5)) + 1.0
    return w if adv_mask is None else torch.where(adv_mask, torch.ones_like(w), w)
