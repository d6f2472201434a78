"""2-rank checks of `fewstep.engine.nonfinite` with real DeepSpeed engines: ZeRO stages 0-3, fp32 and bf16 (also with
fp32 gradient accumulation: BF16_Optimizer, ZeRO-2's compact partition), torch AdamW and DeepSpeed's own optimizers
(FusedAdam; DeepSpeedCPUAdam under offload_optimizer), with and without gradient accumulation. Run under torchrun:
`nonfinite_worker.py [skip] [naive-step] [naive-zero]` (default all; NONFINITE_RUNS=i,j picks entries of RUNS).

Per configuration, engine A and its twin B (same seed, same data per step index), stepping as the training loop
does (verdict from `local_grad_check`, folded into `reduce_step`, then `engine.step()` or the skip under test):
- normal steps 0 and 1: the verdict is finite on every rank, and the reduced squared-norm shares give the norm
  DeepSpeed reports. At every step the verdict issues no collective (per-group sequence numbers), and every rank
  agrees on what happened (applied, DeepSpeed's counters, LR epoch).
- A only, four bad steps, each skipped: rank 1's loss times NaN; an inf in one element of rank 1's gradient of the
  first parameter (in rank 0's ZeRO partition); a NaN in the last element of a parameter no other step uses (rank
  1's partition); a huge but finite gradient (1e30: finite, and its true norm, though the square overflows fp32;
  skipped by force). The local verdicts must be non-finite exactly where those values are (every rank at stage 0,
  where every rank holds all gradients); after each skip the fp32 masters, model weights, optimizer state (moments,
  step counts, param groups) and LR scheduler state are bit-identical to before the first bad step, and DeepSpeed's
  counters tell skipped steps.
- step 3: A's verdict is finite and A equals B bit for bit (masters, weights, optimizer and scheduler state): the
  skips left nothing behind (no stale or NaN gradients, no advanced Adam step or LR).

Then `value_clip`: grad_clip_method value's `clip_grad_values` clamps the gradients the step reads.

`skip` is `nonfinite.skip_step`, which must pass everything. The naive skips (`naive-step`: call `engine.step()`
anyway; `naive-zero`: zero the gradients, no step) must fail the same checks wherever they are wrong (`must_catch`).
"""
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from fewstep.config import load_config
from fewstep.engine.deepspeed_engine import build_engine, inner_optimizer, master_partitions
from fewstep.engine.distributed import all_gather_object, reduce_step, setup_distributed, teardown, world_size
from fewstep.engine import nonfinite
from fewstep.engine.nonfinite import clip_grad_values, local_grad_check, skip_step

RUNS = [  # stage, precision, optimizer, offload_optimizer, gradient_accumulation_steps, fp32 gradient accumulation
    (0, "fp32", "adamw", False, 2, False), (0, "bf16", "adamw", False, 1, False), (1, "fp32", "adamw", False, 1, False),
    (1, "bf16", "adamw", False, 2, False), (2, "fp32", "adamw", False, 1, False), (2, "bf16", "adamw", False, 2, False),
    (3, "fp32", "adamw", False, 2, False), (3, "bf16", "adamw", False, 1, False),
    (1, "bf16", "adamw", False, 2, True),  # BF16_Optimizer
    (2, "bf16", "adamw", False, 1, True),  # ZeRO-2's compact fp32 gradient partition
    (0, "bf16", "deepspeed", False, 1, False),  # FP16_Optimizer with FusedAdam
    (2, "fp32", "deepspeed", False, 2, False),  # FusedAdam under ZeRO-2
    (3, "bf16", "deepspeed", True, 2, False),  # DeepSpeedCPUAdam
    (2, "bf16", "adamw", True, 1, False),  # torch AdamW on the CPU partitions
    (1, "fp32", "adamw", True, 2, False),
]
NAN, INF = float("nan"), float("inf")


class Poke(torch.autograd.Function):
    """Identity forward; backward writes `value` into one element of the gradient (None: leaves it alone)."""

    @staticmethod
    def forward(ctx, p, index, value):
        ctx.index, ctx.value = index, value
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g):
        if ctx.value is not None:
            g = g.clone()
            g.view(-1)[ctx.index] = ctx.value
        return g, None, None


class Tiny(torch.nn.Module):
    """Odd sizes (134 values), so ZeRO partitions split parameters and end in padding; `spare` only takes part in a
    step that pokes it."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(10, 6) * 0.4)
        self.b1 = torch.nn.Parameter(torch.randn(10) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(5, 10) * 0.4)
        self.b2 = torch.nn.Parameter(torch.randn(5) * 0.1)
        self.spare = torch.nn.Parameter(torch.randn(9) * 0.1)

    def forward(self, x, target, poke=None):
        w = {n: getattr(self, n) for n in ("w1", "b1", "w2", "b2", "spare")}
        if poke is not None:  # same graph on every rank (ZeRO's reductions must match); the value only on one
            name, index, value = poke
            w[name] = Poke.apply(w[name], index, value)
        h = torch.tanh(x.to(w["w1"].dtype) @ w["w1"].t() + w["b1"])
        out = (h @ w["w2"].t() + w["b2"]).float()
        loss = (out - target).pow(2).mean()
        if poke is not None and poke[0] == "spare":
            loss = loss + 0.0 * w["spare"].float().sum()
        return loss


def batch(step, micro, rank):
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(4, 6, generator=gen), torch.randn(4, 5, generator=gen)


def identical(a, b) -> bool:
    """Same dtype, shape and bits (NaN == NaN: ZeRO partitions may end in uninitialised padding)."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    nan = a.isnan() & b.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    return bool((a.view(bits) == b.view(bits)).logical_or(nan).all())


def collectives_issued() -> int:
    """Collectives this rank has issued so far over every process group (DeepSpeed reduces over its own clone of
    the world group); gloo and NCCL count them per group."""
    return sum(pg._get_sequence_number_for_group() for pg in dist.distributed_c10d._world.pg_map)


class Run:
    """One engine with its model, scheduler and the problems found (kept per rank, reduced per configuration)."""

    def __init__(self, cfg, stage, gas, skip, problems):
        torch.manual_seed(0)
        self.model = Tiny()
        self.names = [n for n, _ in self.model.named_parameters()]
        self.engine, _, self.scheduler = build_engine(cfg, self.model, list(self.model.parameters()))
        self.stage, self.gas, self.skip, self.problems = stage, gas, skip, problems
        self.rank, self.applied = self.engine.global_rank, 0
        self.layout = "/".join(type(o).__name__ for o in (self.engine.optimizer, inner_optimizer(self.engine)))

    def check(self, ok, what):
        if not ok:
            self.problems.append(what)

    def snapshot(self):
        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([params[n] for n in self.names], enabled=self.stage == 3):
            weights = {n: params[n].detach().clone() for n in self.names}
        state = []
        opt = inner_optimizer(self.engine)
        for group in opt.param_groups:
            state.append({k: copy.deepcopy(v) for k, v in group.items() if k != "params"})
            state += [{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                      for p in group["params"] if p in opt.state]
        full = [safe_get_full_fp32_param(params[n]) for n in self.names]  # collective
        return {"masters": [m.detach().clone() for m in master_partitions(self.engine)], "weights": weights,
                "optimizer": state, "scheduler": copy.deepcopy(self.scheduler.state_dict()),
                "fp32": None if full[0] is None else [t.detach().clone() for t in full]}

    def compare(self, a, b, what, twins=False):
        """All of it; between twins the masters through `fp32` (DeepSpeed's per-parameter view, without the
        partitions' padding, which starts out as uninitialised memory) where there is one."""
        for key in a:
            if key != "layout" and not (twins and key == "masters" and a["fp32"] is not None):
                self.check(identical(a[key], b[key]), f"{what}: {key} differ")

    def step(self, k, nan_loss=False, poke=None, force_skip=False):
        """One optimizer step on step k's data, as the training loop takes it; the bad value is injected on rank 1 in
        the first micro-step. Returns (this rank's verdict, the global squared norm from the reduction, whether any
        rank saw a non-finite gradient)."""
        for micro in range(self.gas):
            x, target = batch(k, micro, self.rank)
            bad = self.rank == 1 and micro == 0
            p = None if poke is None else (poke[0], poke[1], poke[2] if bad else None)
            loss = self.engine(x, target, p)
            if nan_loss and bad:
                loss = loss * NAN
            self.engine.backward(loss)
            if micro < self.gas - 1:
                self.engine.step()
        issued = collectives_issued()
        check = local_grad_check(self.engine)
        self.check(collectives_issued() == issued, f"step {k}: local_grad_check issued a collective")
        means, flags = reduce_step({"sq_norm": check.sq_norm}, {"nonfinite": not check.finite})
        sq = means["sq_norm"] * world_size()
        if flags["nonfinite"] or force_skip:
            self.skip(self.engine)
        else:
            self.engine.step()
            self.applied += 1
            self.check(self.stage == 0 or collectives_issued() > issued, "the collective count does not move")
            self.check(self.engine.was_step_applied(), f"step {k}: not applied")
            norm = self.engine.get_global_grad_norm()
            if norm is not None:  # stage-0 fp32 reports none
                self.check(abs(math.sqrt(sq) - float(norm)) <= 1e-4 * float(norm), f"norm {math.sqrt(sq)} vs {norm}")
        e = self.engine
        views = all_gather_object((e.was_step_applied(), e.global_steps, e.skipped_steps, self.scheduler.last_epoch))
        self.check(all(v == views[0] for v in views), f"step {k}: ranks disagree (applied, counters, lr): {views}")
        return check.finite, sq, flags["nonfinite"]

    def counters_ok(self, skipped, what):
        e = self.engine
        self.check(e.skipped_steps == skipped and e.global_steps - e.skipped_steps == self.applied
                   and self.scheduler.last_epoch == self.applied,
                   f"{what}: counters global {e.global_steps} skipped {e.skipped_steps} lr epoch "
                   f"{self.scheduler.last_epoch}, {self.applied} applied and {skipped} skipped")


def naive_step(engine):
    """Not skipping at all: DeepSpeed's own handling decides."""
    engine.step()


def naive_zero(engine):
    """Dropping the gradients without stepping the engine."""
    engine.optimizer.zero_grad()


SKIPS = {"skip": skip_step, "naive-step": naive_step, "naive-zero": naive_zero}
BAD_STEPS = [  # what, nan_loss, poke (parameter, element, value on rank 1), ranks whose local verdict is non-finite
    ("NaN loss on rank 1", True, None, lambda replicated: {0, 1}),
    ("inf in w1[0] on rank 1", False, ("w1", 0, INF), lambda replicated: {0, 1} if replicated else {0}),
    ("NaN in spare[-1] on rank 1", False, ("spare", 8, NAN), lambda replicated: {0, 1} if replicated else {1}),
    ("1e30 in w2[0] on rank 1", False, ("w2", 0, 1e30), lambda replicated: set()),  # finite: skipped by force
]


def scenario(cfg, stage, gas, skip, reference, problems):
    """Engine A's run with `skip`, compared with `reference` (twin B's snapshot after its step 3); without a
    reference this is B's run, which returns that snapshot."""
    run = Run(cfg, stage, gas, skip, problems)
    for k in (0, 1):
        finite, sq, nonfinite = run.step(k)
        run.check(finite and not nonfinite and math.isfinite(sq) and sq > 0, f"normal step {k}: verdict {finite}")
    if reference is not None:
        before = run.snapshot()
        for n, (what, nan_loss, poke, where) in enumerate(BAD_STEPS, 1):
            where = where(stage == 0)  # stage 0: every rank holds every (all-reduced) gradient
            finite, sq, nonfinite = run.step(2, nan_loss, poke, force_skip=not where)
            run.check(finite == (run.rank not in where), f"{what}: local verdict {finite} on rank {run.rank}")
            run.check(nonfinite == bool(where) and math.isfinite(sq) == (not where) and (where or sq > 1e58),
                      f"{what}: reduced {nonfinite}, {sq}")  # 1e30 / world size, squared
            run.check(not run.engine.was_step_applied(), f"{what}: step applied")
            run.compare(before, run.snapshot(), f"after {what}")
            run.counters_ok(n, f"after {what}")
            gn = run.engine.get_global_grad_norm()
            run.check(gn == INF or gn is None and stage == 0 and cfg.mixed_precision == "fp32", f"{what}: norm {gn}")
    finite, sq, nonfinite = run.step(3)
    run.check(finite and not nonfinite and math.isfinite(sq), f"step 3 after the skips: verdict {finite}, {sq}")
    after = run.snapshot()
    if reference is None:
        after["layout"] = run.layout
        run.counters_ok(0, "twin")
    else:
        run.compare(reference, after, "step 3 vs the twin's", twins=True)
        run.counters_ok(len(BAD_STEPS), "after step 3")
    return after


CLIP = 0.02  # grad_clip_method value's limit: the Tiny model's gradients lie on both sides of it


def value_clip(cfg, stage, gas, problems):
    """grad_clip_method value: after a normal step, one step whose gradients `clip_grad_values` clamps. The tensors
    the step reads (those `local_grad_check` reads) hold the clamped values, bit for bit, with values on both sides
    of the limit over the ranks; the step is applied, and Adam read them: the gradients its second moments took in
    are within the limit. The norm DeepSpeed reports (its own clip is off) is that of the clamped gradients, except
    with offload_optimizer, where DeepSpeed takes it in backward, as the gradients go to the CPU."""
    cfg = load_config(None, {**{k: getattr(cfg, k) for k in ("model_family", "pretrained_model_name_or_path",
                                                            "deepspeed_config", "zero_stage", "mixed_precision",
                                                            "optimizer", "offload_optimizer", "use_ema",
                                                            "gradient_accumulation_steps", "learning_rate")},
                             "grad_clip_method": "value", "max_grad_norm": CLIP})
    run = Run(cfg, stage, gas, skip_step, problems)
    run.check(run.engine.gradient_clipping() == 0.0, f"DeepSpeed's norm clip is {run.engine.gradient_clipping()}")
    run.step(0)
    for micro in range(gas):
        run.engine.backward(run.engine(*batch(1, micro, run.rank)))
        if micro < gas - 1:
            run.engine.step()
    local_grad_check(run.engine)
    opt = run.engine.optimizer
    before = [t.detach().clone() for t in nonfinite._local_grads(opt, nonfinite._kind(opt))[0]]
    clip_grad_values(run.engine, CLIP)
    after = nonfinite._local_grads(opt, nonfinite._kind(opt))[0]
    run.check(all(identical(a, b.clamp(-CLIP, CLIP)) for a, b in zip(after, before)), "gradients not clamped")
    sides = [int(sum((b.abs() > CLIP).sum() for b in before)), int(sum(((b.abs() < CLIP) & (b != 0)).sum()
                                                                      for b in before))]
    means, _ = reduce_step({"above": sides[0], "below": sides[1], "sq": local_grad_check(run.engine).sq_norm}, {})
    run.check(means["above"] > 0 and means["below"] > 0, f"values above / below the limit: {means}")
    opt = inner_optimizer(run.engine)
    adam = [(opt.param_groups[0]["betas"][1], state) for state in opt.state.values() if "exp_avg_sq" in state]  # (ZeRO-3 offload: params swapped in to step)
    run.check(len(adam) > 0, "no Adam state after a step")
    v_before = [state["exp_avg_sq"].detach().double().clone() for _, state in adam]
    run.engine.step()
    run.check(run.engine.was_step_applied(), "the clipped step was not applied")
    # what Adam read, from its second moment v' = b2 v + (1 - b2) g^2: no value beyond the limit
    read = max([float(((state["exp_avg_sq"].double() - b2 * v) / (1 - b2)).max()) for (b2, state), v in
                zip(adam, v_before)], default=math.inf)
    run.check(read <= CLIP ** 2 * 1.02 + 1e-6, f"Adam read a gradient of {math.sqrt(max(read, 0)):.4g} > {CLIP}")
    norm, sq = run.engine.get_global_grad_norm(), means["sq"] * world_size()
    if norm is not None and not cfg.offload_optimizer:  # stage-0 fp32 reports none
        run.check(abs(math.sqrt(sq) - float(norm)) <= 1e-4 * float(norm), f"clipped norm {math.sqrt(sq)} vs {norm}")


def must_catch(mode, stage, precision, offload) -> bool:
    """Where a naive skip must fail the checks. Zeroing without stepping: everywhere (DeepSpeed's counters, and its
    micro-step count with accumulation, fall behind; ZeRO-3 keeps the NaN gradients). Stepping anyway: where
    DeepSpeed 0.19.8 does not discard the step cleanly itself: stage-0 fp32 applies it; ZeRO-3 and the offloaded
    ZeRO-1/2 skip it but leave the NaN in gradient buffers that later steps read."""
    return mode == "naive-zero" or stage == 3 or offload or stage == 0 and precision == "fp32"


def main():
    modes = sys.argv[1:] or list(SKIPS)
    info = setup_distributed()
    runs = [RUNS[int(i)] for i in os.environ["NONFINITE_RUNS"].split(",")] if "NONFINITE_RUNS" in os.environ else RUNS
    accum = os.path.join(tempfile.mkdtemp(), "fp32_grad_accum.json")
    with open(accum, "w") as fh:
        json.dump({"data_types": {"grad_accum_dtype": "fp32"}}, fh)
    for stage, precision, opt_name, offload, gas, fp32_accum in runs:
        label = (f"stage {stage} {precision} {opt_name}{' offload' if offload else ''} gas {gas}"
                 f"{' fp32-accum' if fp32_accum else ''}")
        cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux",
                                 "deepspeed_config": accum if fp32_accum else None,
                                 "zero_stage": stage, "mixed_precision": precision, "optimizer": opt_name,
                                 "offload_optimizer": offload, "gradient_accumulation_steps": gas,
                                 "use_ema": True,  # ZeRO-3: no persistent (never partitioned) parameters
                                 "learning_rate": 1e-2, "lr_warmup_steps": 3, "max_grad_norm": 1.0})
        start = time.time()
        reference = scenario(cfg, stage, gas, skip_step, None, [])
        for mode in modes:
            problems = []
            try:
                scenario(cfg, stage, gas, SKIPS[mode], reference, problems)
            except Exception as e:  # a naive skip can also break the engine's bookkeeping (on every rank alike)
                if mode == "skip":
                    raise
                problems.append(f"raised {type(e).__name__}: {str(e)[:100]}")
            found = [f"rank {r}: {p}" for r, ps in enumerate(all_gather_object(problems)) for p in ps]
            if mode == "skip" and found:
                raise AssertionError(f"{label}: " + "; ".join(found))
            if mode != "skip" and not found and must_catch(mode, stage, precision, offload):
                raise AssertionError(f"{label}: the checks did not catch {mode}")
            if mode != "skip" and info.rank == 0:
                print(f"{mode} {'caught' if found else 'not caught'}: {label}: {found[0] if found else ''}",
                      flush=True)
        problems = []
        value_clip(cfg, stage, gas, problems)
        found = [f"rank {r}: {p}" for r, ps in enumerate(all_gather_object(problems)) for p in ps]
        if found:
            raise AssertionError(f"{label}: grad_clip_method value: " + "; ".join(found))
        if info.rank == 0:
            print(f"nonfinite ok: {label} ({reference['layout']}, {time.time() - start:.1f} s)", flush=True)
    shutil.rmtree(os.path.dirname(accum))
    if info.rank == 0:
        print("ALL NONFINITE OK", flush=True)
    teardown()  # as launcher/train.py ends: without it gloo's threads can abort the exit (status -6)


if __name__ == "__main__":
    main()
