"""The training loop, top to bottom: set up, (resume), step, log, validate, checkpoint, export.

One loop serves every method: plain flow matching, Glance (two LoRA phases, Slow then Fast, on one loaded base) and
TwinFlow. What differs per method is the loss of one micro-batch, built in `fewstep.steps`, and what validation
samples (`fewstep.validation`). One optimizer step (micro-batches, the step's reduction, the update or its skip) is
`fewstep.optimizer_step`.

`_train` sets up (the config's checks, the data, the model and its engine) and hands over to a `Run`: its resume,
then the loop over phases (`train_phases`) and over one phase's steps (`train_phase`), each phase ending in a
checkpoint, a validation and an export (`end_phase`).

Multi-GPU rules this file keeps (see `fewstep.engine.distributed`): one reduction per optimizer step carries the
logged values and the preemption flag; work that takes different times on different ranks (data scan, cache fill,
rank-0 exports and validation decoding, checkpoint writes) ends in a store-based wait, not a collective with a
timeout.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from fewstep import checkpoint, checkpoint_resume, faults, preemption, rng_streams, run_dir
from fewstep.config import Config, ConfigError
from fewstep.config_warnings import config_warnings
from fewstep.data.dataset import DataOrder
from fewstep.data.prepare import build_dataset, read_data_config
from fewstep.data.record import data_record, resume_warning
from fewstep.ema import EMA
from fewstep.engine import distributed, host_memory
from fewstep.engine.deepspeed_engine import build_ds_config, build_engine, master_partitions
from fewstep.engine.distributed import DistInfo, setup_distributed
from fewstep.engine.loading import load_transformer, local_model
from fewstep.engine.nonfinite_trace import NonFiniteTrace
from fewstep.kernels import resolve_backend
from fewstep.lora import check_targets_before_load, count_params, prepare_trainable
from fewstep.metrics import MetricsLogger, log_main, quiet_library_bars, require_wandb_credentials
from fewstep.models import get_adapter
from fewstep.nan_guard import NonFiniteGuard
from fewstep.optimizer_step import optimizer_step
from fewstep.phase_export import export_dir, export_phase, phase_exported, require_finite_weights
from fewstep.step_context import StepContext
from fewstep.steps import Phase, build_phases, make_step, reset_trainable
from fewstep.validation import validate


def train(cfg: Config) -> dict:
    preemption.install()
    allocator = host_memory.fix_mmap_threshold(cfg.malloc_mmap_threshold)  # before anything large is allocated
    info = setup_distributed(cfg.distributed_timeout_seconds)
    run_dir.resolve_paths(cfg, info)
    with run_dir.locked(cfg.output_dir, info, {"cache_dir": cfg.cache_dir, "logging_dir": cfg.logging_dir}):
        return _train(cfg, info, allocator)


def _train(cfg: Config, info: DistInfo, allocator: str) -> dict:
    is_main, method = info.is_main, cfg.resolved_method
    if not is_main:
        quiet_library_bars()
    seeded = rng_streams.seed(rng_streams.rank_seed(cfg.seed, info.rank))  # this rank's training stream
    adapter = get_adapter(cfg.model_family)
    for warning in config_warnings(cfg):
        log_main(is_main, f"warning: {warning}")
    with distributed.uneven_work("data config"):  # its folder checks may fail on one node only: the others stop too
        data = read_data_config(cfg)  # its mistakes before the model is resolved (a hub id may download first)
    with distributed.uneven_work("W&B credentials check"):  # rank 0 logs; its wandb.init comes after the cache fill
        if is_main:
            require_wandb_credentials(cfg.report_to)
    ds_config = build_ds_config(cfg)
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    stage = ds_config["zero_optimization"]["stage"]  # the deepspeed_config file's, if it sets one
    layout = checkpoint.run_layout(cfg, adapter, stage, info.world_size)
    # before any data or model is read (a hub id not yet cached would download first): rank 0 resolves and compares
    # layouts; every rank gets the same plan (or raises the same ResumeMismatch)
    resume = checkpoint_resume.find_resume(ckpt_root, cfg.resume_from_checkpoint, layout, use_ema=cfg.use_ema)
    phases: list[Phase] = build_phases(cfg, info)
    total = sum(p.steps for p in phases)
    if resume is not None and nothing_left(cfg, phases, resume, ckpt_root):  # no load (a 20B model: minutes)
        log_main(is_main, f"resumed from {resume.path} at step {resume.step}")
        log_main(is_main, end_note(resume.step, total, len(phases)))
        distributed.wait_for_all("end")
        return {"step": resume.step, "preempted": False}
    source = local_model(adapter, cfg.pretrained_model_name_or_path)  # a wrong path or an offline hub id fails here
    check_targets_before_load(cfg, source)
    note = adapter.use_prediction_type(cfg.prediction_type, source)  # a diffusion base: epsilon or v (diff2flow)
    if note:
        log_main(is_main, f"warning: {note}")
    built = build_dataset(cfg, adapter, info, source, data, stop=preemption.requested)  # None: a signal stopped it
    if built is None:  # during the scan or the cache fill (which ends after its batch): no model load (minutes)
        log_main(is_main, preempted_line("before the model loaded"))
        return stopped(resume.step if resume is not None else 0)
    dataset, resolution, shuffle = built

    log_main(is_main, f"loading {cfg.pretrained_model_name_or_path}")
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    with distributed.uneven_work("VAE load"):  # rank 0 decodes the validation images (kept on the host between)
        vae_dtype = dtype if info.device.type == "cuda" else torch.float32  # as the cache fill's encoders
        vae = adapter.load(source, dtype=vae_dtype, with_denoiser=False, with_text=False).vae if is_main else None
        faults.work_at("load")
    transformer = load_transformer(adapter, source, dtype, ds_config, info.device)  # training dtype
    if method == "twinflow" and not hasattr(transformer, adapter.anystep_module):
        raise ConfigError(f"TwinFlow needs a denoiser with a `{adapter.anystep_module}` to carry the timestep-sign and "
                         f"target-time inputs; {type(transformer).__name__} ({cfg.model_family}) has none")
    rng_streams.set_state(seeded)  # loading may have drawn (library initialisers, a cache fill on some ranks only)
    trainable = prepare_trainable(cfg, adapter, transformer, anystep_embeddings=(method == "twinflow"))
    stream = rng_streams.state()  # the loop continues from here on a fresh run
    n_trainable = count_params(trainable)
    engine, _, scheduler = build_engine(cfg, transformer, trainable, ds_config)
    backend = resolve_backend(cfg.fused_kernels)
    ema = EMA(master_partitions(engine), cfg.ema_decay, backend) if cfg.use_ema else None
    log_main(is_main, f"host memory: {allocator}")
    per_step = (cfg.train_batch_size, cfg.gradient_accumulation_steps, info.world_size)
    batch = math.prod(per_step)
    log_main(is_main, f"{method} | {cfg.model_family} {cfg.model_type} | {n_trainable:,} trainable params | "
                      f"world {info.world_size} | ZeRO-{stage} | {str(dtype).removeprefix('torch.')} | {total} steps "
                      f"of {batch} sample{'' if batch == 1 else 's'} ({' x '.join(map(str, per_step))}: per rank, "
                      f"accumulation, ranks) | lr {cfg.learning_rate:g} {cfg.lr_scheduler} | clip {clipping(cfg)} | "
                      f"{len(dataset)} sample{'' if len(dataset) == 1 else 's'} @ {resolution}px")

    order = DataOrder(len(dataset), cfg.train_batch_size, info.rank, info.world_size, cfg.seed, shuffle,
                      sampling=cfg.data_backend_sampling)
    with distributed.uneven_work("data record"):  # rank 0 writes it into each checkpoint (seconds at 10 M images)
        data_now = data_record(dataset, cfg.seed, cfg.data_backend_sampling, order.global_batch) if is_main else None
    initial = None  # the trainable weights and LR schedule a later Glance phase starts from
    if len(phases) > 1:
        initial = ([m.detach().clone() for m in master_partitions(engine)], scheduler.state_dict())

    guard = NonFiniteGuard(cfg.nan_policy, cfg.nan_max_bad_steps)
    checkpoints = RunCheckpoints(ckpt_root, engine, info, trainable, cfg.checkpoints_total_limit,
                                 {"method": method, "layout": layout, "data": data_now})
    ctx = StepContext(cfg=cfg, adapter=adapter, engine=engine, dataset=dataset, order=order, device=info.device,
                      dtype=dtype, backend=backend, ema=ema)
    run = Run(cfg, info, ctx, transformer, trainable, scheduler, guard, phases, checkpoints, vae, resolution, initial,
              trace=NonFiniteTrace(transformer) if cfg.nan_trace else None)
    rank_state = None
    if resume is not None:  # engine, EMA and cursors, resharded to this world size / ZeRO stage if they changed
        rank_state = run.resume(resume, data, data_now)
    elif cfg.resume_from_checkpoint == "latest":
        log_main(is_main, "resume_from_checkpoint=latest: no checkpoint yet, starting fresh")
    if ema is not None and method == "twinflow" and resume is None:
        # The reference updates TwinFlow's EMA right before each step's teacher passes, on the weights that step
        # trains from: the same as one update now (the first copies) and one after every applied step.
        ema.update()

    if signalled(is_main, "before the first step"):  # while loading: nothing new to save
        return stopped(run.step)
    with distributed.uneven_work("metrics logger"):  # rank 0's alone (TensorBoard's import, wandb.init: seconds)
        faults.work_at("logger")
        run.logger = MetricsLogger.from_config(cfg, is_main, total, run.step, desc=method)
    rng_streams.set_state(rank_state["rng"] if rank_state is not None else stream)  # last: nothing above draws on
    rank_state = None  # a reshard's tensors map the checkpoint's files: held, NFS could not prune that checkpoint
    return run.train_phases()


@dataclass
class Run:
    """One training once its model is loaded: the engine and what a checkpoint saves beside it, and the loop over the
    phases (one, or Glance's Slow then Fast) from `step` on."""
    cfg: Config
    info: DistInfo
    ctx: StepContext              # the engine, data order, EMA and the rest a micro-step reads
    transformer: torch.nn.Module
    trainable: list
    scheduler: object             # the LR schedule
    guard: NonFiniteGuard
    phases: list[Phase]
    checkpoints: RunCheckpoints
    vae: object                   # rank 0's, for validation images (None on the other ranks)
    resolution: int
    initial: tuple | None         # the trainable weights and LR schedule a later Glance phase starts from
    trace: NonFiniteTrace | None = None  # nan_trace: names the first module with a non-finite output
    logger: MetricsLogger | None = None  # made after the resume, at the step it continues from
    step: int = 0

    @property
    def total(self) -> int:
        return sum(p.steps for p in self.phases)

    def rank_checkpoint_state(self) -> dict:  # what this rank saves beside DeepSpeed's files (and its RNG streams)
        ema = self.ctx.ema
        return {"order": self.ctx.order.state_dict(), "ema": ema.state_dict() if ema else None,
                "nan_guard": self.guard.state_dict(),
                "samplers": [p.sampler.state_dict() if p.sampler else None for p in self.phases]}

    def save(self, at: int) -> None:
        self.checkpoints.save(at, self.rank_checkpoint_state)

    def train_phases(self) -> dict:
        """Every phase from `self.step` on (one finished before a restart but not exported is exported now). Returns
        what `train` does: the step reached, and whether a signal stopped the run."""
        is_main, end = self.info.is_main, 0
        self.ctx.engine.train()
        try:
            for idx, phase in enumerate(self.phases):
                start, end = end, end + phase.steps
                if self.step < end:
                    if not self.train_phase(idx, phase, start, end):
                        return stopped(self.step)
                    self.end_phase(phase)
                elif self.step == end and not phase_exported(self.cfg, phase, end):  # interrupted before its export
                    log_main(is_main, f"{phase.name}: finished at step {end} but not exported (interrupted); exporting")
                    self.validate_and_export(phase)
                else:  # finished and exported before this (re)start
                    continue
                if idx + 1 < len(self.phases) and signalled(is_main, f"after {phase.name}'s export"):
                    return stopped(self.step)
            if self.step == self.total and self.checkpoints.last_saved != self.step:
                self.save(self.step)  # resumed at the end from another run's folder: one in this run's own
        finally:
            self.logger.close()
        distributed.wait_for_all("end")
        return {"step": self.step, "preempted": False}

    def train_phase(self, idx: int, phase: Phase, start: int, end: int) -> bool:
        """Steps from `self.step` to the phase's `end`, with the validations and checkpoints due on the way; a later
        Glance phase (`idx` > 0) starts from the initial LoRA. False: a signal stopped the run (after saving a
        checkpoint where there was new state)."""
        cfg, info, ema, is_main = self.cfg, self.info, self.ctx.ema, self.info.is_main
        if self.step == start and idx > 0:  # a fresh LoRA for the next Glance phase
            weights, schedule = self.initial
            reset_trainable(self.ctx.engine, weights, self.scheduler, schedule)
            if ema is not None:
                ema.reset()
        step_fn = make_step(cfg.resolved_method, phase, self.ctx)
        clip_value = cfg.max_grad_norm if cfg.grad_clip_method == "value" else 0.0  # per value; else DeepSpeed's norm
        self.logger.restart_clock()
        while self.step < end:
            lr = self.scheduler.get_last_lr()[0]  # the rate this step trains at (its optimizer step moves it on)
            outcome = optimizer_step(self.ctx.engine, step_fn, cfg.gradient_accumulation_steps, self.step + 1, info,
                                     self.guard, self.trace, clip_value)
            due = False
            if outcome.applied:
                if ema is not None:  # after an applied step only: a skipped one leaves it as it was
                    ema.update()
                self.step += 1
                faults.poison_weights_if(self.trainable, self.step, info.rank)
                self.logger.log(self.step, {**outcome.logs, "lr": lr, "grad_norm": outcome.grad_norm,
                                            "skipped_steps": self.guard.skipped},
                                cfg.train_batch_size * cfg.gradient_accumulation_steps * info.world_size)
                due = (bool(cfg.checkpointing_steps) and self.step % cfg.checkpointing_steps == 0
                       and self.step < self.total)
            # A preempted step saves, a skipped one too (its data draws and non-finite streak are state), but not
            # before a later Glance phase's first step: that fresh LoRA is no state of step N (Slow's end, saved).
            fresh_phase = idx > 0 and self.step == start
            if due or (outcome.preempt and not fresh_phase):
                self.save(self.step)  # before the step's validation: a failed one (an OOM, a full disk) loses nothing
            if outcome.applied:
                faults.crash_if("FEWSTEP_FAULT_AFTER_STEP", self.step)
            if outcome.preempt:
                log_main(is_main, f"preempted at step {self.step}, " + (
                    f"before {phase.name}'s first step: nothing to save" if fresh_phase else "checkpoint saved"))
                return False
            if outcome.applied and cfg.validation_steps and self.step % cfg.validation_steps == 0 and self.step < end:
                log_main(is_main, f"{phase.name}: validating at step {self.step}")
                with rng_streams.isolated():
                    validate(self.ctx, phase, self.step, self.logger, self.vae, is_main)
            if due and signalled(is_main, f"at checkpoint step-{self.step}"):  # not one more step and save
                return False
            self.logger.restart_clock()  # the next step's samples/s counts its own time, not a save or validation
        return True

    def end_phase(self, phase: Phase) -> None:
        """The phase's checkpoint, then its validation and export. A checkpoint that cannot be written (a full disk)
        still leaves the trained weights exported (a LoRA is a small fraction of a checkpoint's size)."""
        at = self.step
        if self.checkpoints.last_saved == at:
            return self.validate_and_export(phase)
        try:
            self.save(at)  # before the export: a failed or killed export loses no training
        except checkpoint.CheckpointWriteError as e:
            try:
                self.validate_and_export(phase)
            except Exception as also:  # noqa: BLE001 - the export on a full disk: an OSError, another rank's failure
                raise checkpoint.CheckpointWriteError(f"{e}. The {phase.name} export failed too: {also}") from None
            raise checkpoint.CheckpointWriteError(f"{e}. The weights trained to step {at} were exported nonetheless "
                                                  f"({export_dir(self.cfg, phase)})") from None
        self.validate_and_export(phase)

    @rng_streams.isolated()
    def validate_and_export(self, phase: Phase) -> None:
        """The phase's validation and export, at `self.step`."""
        log_main(self.info.is_main, f"{phase.name}: validating and exporting")
        validate(self.ctx, phase, self.step, self.logger, self.vae, self.info.is_main)
        export_phase(self.cfg, self.ctx.adapter, self.ctx.engine, self.transformer, self.ctx.ema, phase, self.step,
                     self.resolution, self.info.is_main)

    def resume(self, plan: checkpoint_resume.Resume, data, data_now) -> dict:
        """Engine, EMA, data cursors, non-finite guard and timestep samplers from the checkpoint `plan` names, with
        this run's optimizer settings over the saved ones; says what changed since. Returns this rank's saved state
        (its RNG streams: set by the caller last, after everything else that draws)."""
        cfg, is_main, total, ctx = self.cfg, self.info.is_main, self.total, self.ctx
        rank_state, trainer_state = checkpoint_resume.restore(plan, ctx.engine, self.info.rank, ema=ctx.ema,
                                                              seed=cfg.seed)
        self.step = step = int(trainer_state["step"])
        ctx.order.load_state_dict(rank_state["order"])
        self.guard.load_state_dict(rank_state.get("nan_guard") or {})  # absent from checkpoints before 2026-12-06
        for p, s in zip(self.phases, rank_state["samplers"]):
            if p.sampler is not None and s is not None:
                p.sampler.load_state_dict(s)
        log_main(is_main, f"resumed from {plan.path} at step {step}{plan.note}")
        changed = checkpoint_resume.apply_configured_settings(ctx.engine, cfg)
        if changed and step < total:
            log_main(is_main, f"note: {', '.join(changed)} since the checkpoint: this run's values apply from step "
                              f"{step + 1}")
        with distributed.uneven_work("data record check"):  # rank 0's (it made the record)
            changed = resume_warning(trainer_state.get("data"), data_now, data.images, plan.path) if is_main else None
            if changed:
                log_main(is_main, f"warning: {changed}")
        if step >= total:  # the loop has nothing to do (a finished phase's missing export is still written)
            log_main(is_main, end_note(step, total, len(self.phases)))
        checkpoints = self.checkpoints
        later = checkpoint.later_than(checkpoints.root, step) if is_main else []
        if later:  # a resume from an earlier step: the abandoned run's checkpoints stay
            log_main(is_main, f"note: {', '.join(later)} (later steps of an earlier run) are kept, neither pruned "
                              "nor counted in checkpoints_total_limit; this run replaces one only by saving that step")
        checkpoints.abandoned.update(later, trainer_state.get("abandoned", []))
        if checkpoint_resume.in_own_folder(plan, checkpoints.root):
            checkpoints.last_saved = step
        return rank_state


@dataclass
class RunCheckpoints:
    """This run's checkpoint saves, and what they must know of its line: the newest checkpoint of its own
    (`last_saved`: none yet, or the one it resumed from if that is in its own folder) and the checkpoints an earlier
    run wrote after the step this one resumed from (`abandoned`: kept, neither pruned nor counted, until this run
    saves that step itself)."""
    root: str
    engine: object
    info: DistInfo
    trainable: list
    limit: int            # checkpoints_total_limit
    meta: dict            # trainer.json's method, layout and data record
    last_saved: int | None = None
    abandoned: set[str] = field(default_factory=set)

    @rng_streams.isolated()
    def save(self, at: int, rank_state: Callable[[], dict]) -> None:
        """Checkpoint step-`at`: DeepSpeed's files and this rank's `rank_state()` (cursors, EMA, guard, samplers)."""
        is_main = self.info.is_main
        require_finite_weights(self.trainable, f"checkpoint step-{at}")  # a non-finite weight never reaches one
        log_main(is_main, f"saving checkpoint step-{at}")  # minutes for a large model: say so before, not only after
        self.abandoned.discard(f"step-{at}")  # re-saved: this run's now
        path = checkpoint.save(self.root, at, self.engine, self.info.rank, rank_state(), self.meta, self.limit,
                               self.abandoned)
        self.last_saved = at
        log_main(is_main, f"checkpoint saved: {path}")


def nothing_left(cfg: Config, phases: list[Phase], resume: checkpoint_resume.Resume, ckpt_root: str) -> bool:
    """Resumed at or past the end, from this run's own checkpoint, with every phase that ended there exported: there
    is nothing to train, export or save, so nothing need be loaded. Rank 0 decides (collective)."""
    verdict = None
    if distributed.rank() == 0:
        verdict = checkpoint_resume.in_own_folder(resume, ckpt_root) and resume.step >= sum(p.steps for p in phases)
    if not distributed.broadcast_object(verdict):
        return False
    end = 0
    for phase in phases:  # a phase whose end the checkpoint is at may have been interrupted before its export
        end += phase.steps
        if resume.step == end and not phase_exported(cfg, phase, end):
            return False
    return True


def clipping(cfg) -> str:
    """The gradient clipping in effect, for the start-up line: fewstep's default and SimpleTuner's differ, and a
    config written only in the spelling both share gets fewstep's (README, "SimpleTuner configs")."""
    if not cfg.max_grad_norm:
        return "off"
    return (f"global norm {cfg.max_grad_norm:g}" if cfg.grad_clip_method == "norm" else
            f"each value to +-{cfg.max_grad_norm:g}")


def end_note(step: int, total: int, phases: int) -> str:
    return (f"note: step {step} is {'the end' if step == total else 'past the end'} of this run ({total} steps"
            f"{' over both Glance phases' if phases > 1 else ''}): nothing left to train; "
            + ("to train Glance's LoRAs longer, start a new run (another output_dir)" if phases > 1
               else "raise max_train_steps to train further"))


def signalled(is_main: bool, when: str) -> bool:
    """Whether any rank has a preemption signal (collective); if so, says so."""
    if not distributed.any_rank(preemption.requested()):
        return False
    log_main(is_main, preempted_line(when))
    return True


def preempted_line(when: str) -> str:
    return f"preempted ({preemption.received() or 'another rank'}) {when}; exiting"


def stopped(step: int) -> dict:
    """The result of a run stopped by a signal (the flag forgotten: a second training in this process starts clean)."""
    received = preemption.received()
    preemption.clear()
    return {"step": step, "preempted": True, "signal": received}
