"""2-rank checks of the engine's access to the fp32 masters, for ZeRO stages 0-3, fp32 and bf16, LoRA and full, torch
AdamW and DeepSpeed's own optimizers (FusedAdam; DeepSpeedCPUAdam under offload_optimizer). Run under torchrun.

- `weights_swapped_in`: inside it every trained parameter (gathered) holds the replacement values, after it the
  original values exactly; entering and leaving it (and `load_master`) synchronise the accelerator before and after
  writing the weights the model computes with.
- Glance's reset (`reset_trainable`: initial weights, fresh Adam and LR schedule): the step after it repeats the very
  first step bit for bit, after Adam has taken several steps (stale moments or step counters would change it).
- The LR schedule reaches the param groups the optimizer steps with.
- A training step (forward, backward, optimizer step) never synchronises the accelerator: the host queues ahead.
- ZeRO's process groups keep `distributed_timeout_seconds`.
"""
import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from fewstep import reshard
from fewstep.config import load_config
from fewstep.engine.deepspeed_engine import (_layout, build_engine, inner_optimizer, lr_lambda, master_partitions,
                                             weights_swapped_in)
from fewstep.engine.distributed import setup_distributed
from fewstep.lora import prepare_trainable
from fewstep.models import get_adapter
from fewstep.steps import reset_trainable

RUNS = [  # stage, precision, model_type, optimizer, offload_optimizer
    (0, "fp32", "lora", "adamw", False), (0, "bf16", "full", "adamw", False), (1, "bf16", "lora", "adamw", False),
    (2, "fp32", "full", "adamw", False), (2, "bf16", "lora", "adamw", False), (3, "fp32", "lora", "adamw", False),
    (3, "bf16", "full", "adamw", False),
    (2, "fp32", "lora", "deepspeed", False),  # FusedAdam
    (0, "bf16", "lora", "deepspeed", False),  # FusedAdam under DeepSpeed's fused FP16 wrapper (one flat fp32 copy)
    (3, "bf16", "full", "deepspeed", True),  # DeepSpeedCPUAdam
    (2, "bf16", "lora", "adamw", True),  # torch AdamW on the CPU partitions
]


class SyncProbe:
    """Wraps the accelerator's `synchronize`: calls the real one and records, per call, the first elements of the
    first low-precision copy (None where the layout has none)."""

    def __init__(self, lowp):
        self.real, self.lowp, self.calls = get_accelerator().synchronize, lowp, []

    def __call__(self, *args, **kwargs):
        self.calls.append(None if self.lowp is None else head(self.lowp[0]))
        return self.real(*args, **kwargs)

    def during(self, fn):
        self.calls = []
        get_accelerator().synchronize = self
        try:
            fn()
        finally:
            get_accelerator().synchronize = self.real
        return self.calls


def head(t, dtype=None):
    return t.detach().reshape(-1)[:8].to(dtype or t.dtype).float().clone()


def check_ordered(probe, fn, old, new, label):
    """The swap's writes happen between two syncs: the first sees `old` values, the last `new` ones."""
    calls = probe.during(fn)
    assert len(calls) >= 2, (label, "synchronize calls", len(calls))
    if old is not None:
        assert torch.equal(calls[0], old) and torch.equal(calls[-1], new), (label, calls[0], calls[-1], old, new)


def same(a, b):
    """Equal, NaN == NaN (the last ZeRO partition ends in uninitialised padding)."""
    return bool((a.eq(b) | (a.isnan() & b.isnan())).all())


TIMEOUT_SECONDS = 1234  # distributed_timeout_seconds: neither gloo's default (30 min) nor NCCL's (10 min)


def group_timeout(group) -> float:
    return group._get_backend(info.device).options._timeout.total_seconds()


info = setup_distributed(TIMEOUT_SECONDS)
adapter = get_adapter("flux")
for stage, precision, model_type, opt_name, offload in RUNS:
    label = f"stage {stage} {precision} {model_type} {opt_name}{' offload' if offload else ''}"
    cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux",
                             "zero_stage": stage, "mixed_precision": precision, "model_type": model_type,
                             "use_ema": True, "lora_rank": 4, "optimizer": opt_name, "offload_optimizer": offload,
                             "learning_rate": 1e-3, "lr_warmup_steps": 3})
    torch.manual_seed(0)
    t = adapter.load("tiny:flux", with_text=False, with_vae=False).denoiser
    trainable = prepare_trainable(cfg, adapter, t, anystep_embeddings=True)
    with torch.no_grad():  # non-trivial values everywhere (LoRA B starts at zero)
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.1)
    names = [n for n, p in t.named_parameters() if p.requires_grad]
    initial_weights = {n: p.detach().float().clone() for n, p in t.named_parameters() if p.requires_grad}
    engine, optimizer, scheduler = build_engine(cfg, t, trainable)
    params = dict(engine.module.named_parameters())
    # ZeRO's collectives (gradient reductions, weight gathers) keep the run's timeout: DeepSpeed runs them on its
    # clone of the world group, which it once made with torch's default (NCCL: 10 minutes) whatever the option said
    groups = [engine.data_parallel_group, getattr(engine.optimizer, "dp_process_group", None),
              *(getattr(p, "ds_process_group", None) for p in trainable[:1])]
    assert [group_timeout(g) for g in groups if g is not None] == [TIMEOUT_SECONDS] * sum(
        g is not None for g in groups), (label, [group_timeout(g) for g in groups if g is not None])

    # --- after build_engine Adam has taken no step (DeepSpeed's stage-0 FP16 wrappers take one with zero gradients
    # at construction, which build_engine undoes), and the masters are the initial weights in the run's dtype
    assert reshard._adam_state(engine) == ([], None), (label, reshard._adam_state(engine))
    for n in names:
        want = initial_weights[n].bfloat16().float() if precision == "bf16" else initial_weights[n]
        assert torch.equal(reshard._full(params[n], None, engine).float().cpu().reshape(want.shape), want), (label, n)

    def snapshot():
        with deepspeed.zero.GatheredParameters([params[n] for n in names], enabled=stage == 3):
            return {n: params[n].detach().float().clone() for n in names}

    # --- the swap, and the syncs around its writes
    masters, lowp, _ = _layout(engine.optimizer)
    probe = SyncProbe(lowp)
    before = snapshot()
    replacement = [m.detach() * 2.0 + 0.5 for m in master_partitions(engine)]
    lp_now, lp_new, lp_master = (None, None, None) if lowp is None else \
        (head(lowp[0]), head(replacement[0], lowp[0].dtype), head(masters[0], lowp[0].dtype))
    swap = weights_swapped_in(engine, replacement)
    check_ordered(probe, swap.__enter__, lp_now, lp_new, label + " enter")
    inside = snapshot()
    check_ordered(probe, lambda: swap.__exit__(None, None, None), lp_new, lp_master, label + " exit")
    after = snapshot()
    tol = 0.0 if precision == "fp32" else 2e-2
    for n in names:
        expect = before[n] * 2.0 + 0.5
        err = (inside[n] - expect).abs().max().item()
        assert err <= tol * max(1.0, expect.abs().max().item()), (label, n, err)
        assert torch.equal(after[n], before[n]), (label, n)

    # --- the LR schedule and Glance's reset, through real optimizer steps on a fixed batch
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(info.rank)
    x, sigma = torch.randn(2, 4, 8, 8, generator=gen).to(dtype), torch.rand(2, generator=gen)
    cond = {"prompt_embeds": torch.randn(2, 5, 32, generator=gen).to(dtype),
            "pooled_prompt_embeds": torch.randn(2, 32, generator=gen).to(dtype)}
    schedule = lr_lambda(cfg)

    def train_step(k):
        loss = adapter.forward(engine, x, sigma, cond).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        lr = engine.get_lr()[0]  # what the optimizer's param groups hold
        assert abs(lr - cfg.learning_rate * schedule(k + 1)) < 1e-12, (label, k, lr)

    initial = [m.detach().clone() for m in master_partitions(engine)]
    initial_sched = scheduler.state_dict()
    assert abs(engine.get_lr()[0] - cfg.learning_rate * schedule(0)) < 1e-12, (label, engine.get_lr())
    # Start from a reset too (the state after build_engine is fresh already: checked above).
    reset_trainable(engine, initial, scheduler, initial_sched)
    train_step(0)
    first = [m.detach().clone() for m in master_partitions(engine)]
    assert not all(same(a, b) for a, b in zip(first, initial)), label  # it stepped
    for k in (1, 2, 3):  # DeepSpeed's throughput timer (off in fewstep's config) would sync from its second step on
        calls = probe.during(lambda: train_step(k))
        assert not calls, (label, "a training step synchronised the accelerator", len(calls))
    lp_trained, lp_initial = (None, None) if lowp is None else (head(lowp[0]), head(initial[0], lowp[0].dtype))
    check_ordered(probe, lambda: reset_trainable(engine, initial, scheduler, initial_sched), lp_trained, lp_initial,
                  label + " load_master")
    assert all(same(m, w) for m, w in zip(master_partitions(engine), initial)), label
    train_step(0)
    again = master_partitions(engine)
    assert all(same(a, b) for a, b in zip(again, first)), \
        (label, "step after reset differs from the first step", max((a - b).abs().nan_to_num().max().item()
                                                                    for a, b in zip(again, first)))
    if info.rank == 0:
        inner = inner_optimizer(engine)
        print(f"swap ok: {label} ({len(names)} tensors, {type(engine.optimizer).__name__}/{type(inner).__name__})",
              flush=True)
    del engine, optimizer, scheduler
print("ALL SWAPS OK", flush=True)

from fewstep.engine.distributed import teardown  # noqa: E402

teardown()
