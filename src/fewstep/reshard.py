"""Resuming a checkpoint on another world size or ZeRO stage (the plan is made in `fewstep.checkpoint_layout`).

Three pieces of state are laid out per rank, and each is carried over its own way:

- **Trainable state of LoRA runs** (fp32 masters, Adam moments and step, LR schedule): every save gathers each
  trainable parameter's full fp32 master and moments by name with DeepSpeed's `safe_get_full_fp32_param` /
  `safe_get_full_optimizer_state` into `trainable.pt` (rank 0). A resume on another layout creates the optimizer
  state and writes every rank's piece of each parameter into its masters and moments, then lets DeepSpeed derive the
  weights the model computes with. The writes go through `fragment_map` rather than DeepSpeed's `safe_set_*` twins,
  because ZeRO-3's `set_full_hp_param` (0.19.8) narrows past the end of a parameter whose size does not divide by the
  world size.
- **Trainable state of full fine-tunes**: DeepSpeed's universal checkpoint (`ds_to_universal --inject_missing_state`,
  run by rank 0 into `<checkpoint>/universal/` on first use, then `load_universal`). It keeps the ZeRO stage.
  Frozen weights are never in a fewstep checkpoint: they come from the pretrained model, as on every resume.
- **The EMA** (fp32, sharded exactly like the masters): each rank saves, beside its shadow partition, the map of which
  slice of which parameter each piece of it is (`fragment_map`); a new rank assembles its own pieces from every old
  rank's file (memory-mapped, so only the slices it needs are read).

Per-rank files also hold the data-order and Glance timestep cursors, which count global sample positions and are the
same on every rank (taken from rank 0), and the RNG states: a rank that existed keeps its own streams, a new rank
starts streams seeded from (seed, rank, step).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import shutil

import numpy as np
import torch

from fewstep import checkpoint_space as space, rng_streams
from fewstep.checkpoint_files import fsync, fsync_tree
from fewstep.checkpoint_layout import TRAINABLE_FILE, ResumeMismatch
from fewstep.engine.deepspeed_engine import load_master, master_partitions
from fewstep.errors import UserError

UNIVERSAL_DIR = "universal"
UNIVERSAL_DONE = "conversion-complete"  # written last, after every converted file


def trainable_named(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _inner(engine):
    """The torch optimizer doing the Adam maths (its state is keyed by the master partitions)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _shape(p) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


# ---------------------------------------------------------------------------------------------------------------
# Which piece of which parameter each rank's master partition holds
# ---------------------------------------------------------------------------------------------------------------

def _stage0_fp32_copies(opt) -> dict[int, tuple[int, int]]:
    """Stage 0 with bf16/fp16 weights (DeepSpeed's FP16 wrappers): id(model parameter) -> (index into
    `master_partitions`, start there) of its fp32 copy. The fused wrapper (FusedAdam) keeps one flat fp32 copy per
    param group, its parameters in order; the unfused one (torch AdamW) one fp32 copy per parameter."""
    if not hasattr(opt, "fp16_groups") or hasattr(opt, "fp32_partitioned_groups_flat"):  # (ZeRO-3 has fp16_groups)
        return {}
    if hasattr(opt, "fp32_groups_flat"):
        out = {}
        for g, group in enumerate(opt.fp16_groups):
            start = 0
            for p in group:
                out[id(p)] = (g, start)
                start += p.numel()
        return out
    if hasattr(opt, "fp32_groups"):
        return {id(p): (i, 0) for i, p in enumerate(p for group in opt.fp16_groups for p in group)}
    return {}


def _stage0_master(p, copies: dict, index: dict) -> tuple[int, int] | None:
    """Stage 0: (index into `master_partitions`, start there) of parameter p's fp32 master, which is its fp32 copy
    (`copies`, bf16/fp16 weights) or p itself (fp32 weights: `index`, the masters' positions by id); None if neither."""
    if id(p) in copies:
        return copies[id(p)]
    return (index[id(p)], 0) if id(p) in index else None


def _stage0_maps(engine) -> tuple[dict, dict, list]:
    """What `_stage0_master` looks a parameter up in, and the masters it indexes."""
    masters = master_partitions(engine)
    return _stage0_fp32_copies(engine.optimizer), {id(m): i for i, m in enumerate(masters)}, masters


def fragment_map(engine) -> dict[str, tuple[int, int, int, int]] | None:
    """name -> (index into `master_partitions`, start there, start in the flattened parameter, count) for this rank's
    piece of every trainable parameter (absent where this rank holds none); None for an unknown optimizer layout."""
    opt, (copies, index, _) = engine.optimizer, _stage0_maps(engine)
    out = {}
    for name, p in trainable_named(engine):
        if hasattr(p, "ds_id"):  # ZeRO-3: every parameter split evenly (padded) over the ranks
            if not hasattr(opt, "grad_position"):
                return None
            group, offset, part = opt.grad_position[opt.get_param_id(p)]
            rank = opt._get_param_partition_rank(p)
            start = rank * int(part)
            count = max(0, min(int(part), _numel(p) - start))
            if count:
                out[name] = (int(group), int(offset), start, count)
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and the BF16 optimizer: flat groups cut into equal partitions
            m = p._hp_mapping
            if m is not None and m.lp_fragment_address.numel:
                out[name] = (int(m.param_group_index), int(m.hp_fragment_address.start),
                             int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel))
        elif (master := _stage0_master(p, copies, index)) is not None:  # stage 0: the whole parameter, replicated
            out[name] = (*master, 0, p.numel())
        else:
            return None
    return out


def _piece(sources, name: str, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of parameter `name` (flattened), from (fragment map, partitions) pairs. Where
    the saved ranks held replicas (stage 0: every rank all of it), the first rank's are taken."""
    out = torch.empty(count, dtype=torch.float32)
    filled = torch.zeros(count, dtype=torch.bool)
    for fmap, parts in sources:
        frag = fmap.get(name)
        if frag is None:
            continue
        i, hp, lp, n = frag
        lo, hi = max(start, lp), min(start + count, lp + n)
        if lo < hi:
            out[lo - start:hi - start] = parts[i].reshape(-1)[hp + lo - lp:hp + hi - lp]
            filled[lo - start:hi - start] = True
            if filled.all():
                break
    covered = int(filled.sum())
    if covered != count:
        raise RuntimeError(f"resharding: the saved pieces of '{name}' cover {covered} of the {count} elements "
                           f"[{start}, {start + count}) this rank needs")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Stage-independent trainable state (LoRA runs)
# ---------------------------------------------------------------------------------------------------------------

def _adam_state(engine) -> tuple[list[str], int | None]:
    """The per-element optimizer state keys (exp_avg, exp_avg_sq) and the Adam step, [] and None before a step."""
    inner, masters = _inner(engine), master_partitions(engine)
    state = inner.state.get(masters[0]) if masters else None
    if not state:
        return [], None
    keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == masters[0].shape)
    step = state.get("step", inner.param_groups[0].get("step"))
    return keys, (None if step is None else int(step.item() if torch.is_tensor(step) else step))


def _relink(opt) -> None:
    """ZeRO-1/2 and BF16: point each parameter's optimizer-state fragments at the current state tensors."""
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _full(p, key, engine, stage0=None) -> torch.Tensor:
    """The full fp32 master (key None) or optimizer state of one parameter (collective under ZeRO). `stage0`: the
    engine's `_stage0_maps`, when the caller has them (one per parameter is slow)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        return safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    copies, index, masters = stage0 or _stage0_maps(engine)
    place = _stage0_master(p, copies, index)
    if place is None:
        raise RuntimeError(f"resharding: no fp32 master of a trainable parameter of shape {tuple(p.shape)} in "
                           f"{type(engine.optimizer).__name__}'s state")
    i, start = place
    master = masters[i]
    t = master.detach() if key is None else _inner(engine).state[master][key]
    return t.reshape(-1)[start:start + p.numel()].view(p.shape)


def gather_trainable(engine, rank: int) -> dict | None:
    """Every trainable parameter's full fp32 master and Adam moments, by name (collective; rank 0 gets the dict)."""
    inner = _inner(engine)
    keys, step = _adam_state(engine)
    if keys:
        _relink(engine.optimizer)  # e.g. right after a resume, before DeepSpeed links them at its next step
    params, stage0 = {}, _stage0_maps(engine)
    for name, p in trainable_named(engine):
        values = {"fp32": _full(p, None, engine, stage0), **{k: _full(p, k, engine, stage0) for k in keys}}
        if rank == 0:
            params[name] = {k: v.detach().to("cpu", torch.float32).reshape(_shape(p)).clone()
                            for k, v in values.items()}
    if rank != 0:
        return None
    sched = engine.lr_scheduler
    return {"format": 1, "params": params, "optim_keys": keys, "adam_step": step, "optimizer": type(inner).__name__,
            "scheduler": sched.state_dict() if sched is not None else None,
            "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
            "skipped_steps": int(engine.skipped_steps)}  # global - skipped = applied steps (engine/nonfinite.py)


def _typed_step(inner, group: dict, step: int, device):
    """The Adam step as this optimizer keeps it: a tensor for torch's Adam/AdamW, an int for DeepSpeed's."""
    if type(inner).__module__.startswith("torch.optim"):
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        on = device if group.get("capturable") or group.get("fused") else "cpu"
        return torch.tensor(float(step), dtype=dtype, device=on)
    return int(step)


def apply_trainable(engine, saved: dict) -> None:
    """Restore `gather_trainable`'s dict into this engine, whatever its ZeRO stage and world size (collective under
    ZeRO-3: persistent parameters are re-gathered)."""
    named, params = trainable_named(engine), saved["params"]
    missing = [n for n, _ in named if n not in params]
    unexpected = [n for n in params if n not in dict(named)]
    wrong = [f"{n} {tuple(params[n]['fp32'].shape)} vs {_shape(p)}" for n, p in named
             if n in params and tuple(params[n]["fp32"].shape) != _shape(p)]
    if missing or unexpected or wrong:
        raise ResumeMismatch(f"{TRAINABLE_FILE} does not hold this run's trainable parameters: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}")
    opt, inner = engine.optimizer, _inner(engine)
    masters = master_partitions(engine)
    fmap = fragment_map(engine)
    if fmap is None:
        raise ResumeMismatch(f"cannot place {TRAINABLE_FILE} into {type(opt).__name__}: unknown optimizer layout")
    if hasattr(opt, "checkpoint_event_prologue"):
        opt.checkpoint_event_prologue()  # ZeRO-3: every parameter back to its partition
    keys, step = saved["optim_keys"], saved["adam_step"]
    with torch.no_grad():
        if keys and step is not None:  # the state Adam creates at its first step, then filled below
            for group in inner.param_groups:
                if "step" in group:  # FusedAdam seeds new states' step from here
                    group["step"] = step
            for m in masters:
                inner.state[m] = {"step": _typed_step(inner, inner.param_groups[0], step, m.device),
                                  **{k: torch.zeros_like(m) for k in keys}}
            _relink(opt)
        for name, (i, hp, lp, n) in fmap.items():
            value = params[name]
            masters[i].view(-1)[hp:hp + n].copy_(value["fp32"].reshape(-1)[lp:lp + n])
            if keys and step is not None:
                for k in keys:
                    inner.state[masters[i]][k].view(-1)[hp:hp + n].copy_(value[k].reshape(-1)[lp:lp + n])
    load_master(engine, [m.detach().clone() for m in masters])  # the weights the model computes with
    if hasattr(opt, "checkpoint_event_epilogue"):
        opt.checkpoint_event_epilogue()  # ZeRO-3: re-gather persistent parameters from their new shards
    sched = engine.lr_scheduler
    if sched is not None and saved.get("scheduler") is not None:
        sched.load_state_dict(saved["scheduler"])
        for group, lr in zip(inner.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = saved.get("global_steps", engine.global_steps)
    engine.global_samples = saved.get("global_samples", engine.global_samples)
    engine.skipped_steps = saved.get("skipped_steps", engine.skipped_steps)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed's universal checkpoint (full fine-tunes, another world size within one stage)
# ---------------------------------------------------------------------------------------------------------------

class UniversalConversionError(UserError):
    """The universal checkpoint could not be written (a full disk, ...); the checkpoint itself is untouched."""


def convert_universal(path: str, engine_tag: str, saved_world: int) -> str:
    """Rank 0: `ds_to_universal --inject_missing_state` of `path/<engine_tag>` into `path/universal` (once; written
    to a temporary folder, fsynced, marked complete and renamed, so an interrupted conversion is redone and a rename
    never reaches a shared filesystem before the files do). A conversion that cannot fit is not started, and one
    that fails (ENOSPC) leaves nothing behind; both raise UniversalConversionError naming the space it needs."""
    out = os.path.join(path, UNIVERSAL_DIR)
    if os.path.isfile(os.path.join(out, UNIVERSAL_DONE)):
        return out
    from deepspeed.checkpoint import ds_to_universal

    tmp = os.path.join(path, f".{UNIVERSAL_DIR}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The converter writes each parameter's fp32 weights and Adam moments once (what the optimizer files hold), after
    # extracting every rank's fragments to a temporary folder it deletes at the end: about twice their size at peak.
    source = os.path.join(path, engine_tag)
    need = 2 * sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if "optim_states" in f)
    if space.check_enabled() and shutil.disk_usage(path).free < need:
        raise UniversalConversionError(_conversion_failed(
            path, saved_world, need, f"it was not started: only {space.free(path)} is free there "
            f"({space.SPACE_CHECK_ENV}=0 skips this check)"))
    args = argparse.Namespace(input_folder=source, output_folder=tmp, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()  # the converter prints its progress; keep the training log readable
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
                space.torch_saves_keeping_errno():
            ds_to_universal.main(args)
        with open(os.path.join(tmp, UNIVERSAL_DONE), "w"):
            pass
        fsync_tree(tmp)  # every file and directory, the marker included (rank 0 wrote them all)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = space.os_error(e)
        if cause is None:  # not a write that failed: a defect, shown with its traceback
            raise
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            way = None  # _conversion_failed's own: free some space
        elif cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            way = "Make its folder writable and resume again, or resume from a copy of it in a writable folder"
        else:
            way = "Resolve that and resume again"
        raise UniversalConversionError(_conversion_failed(
            path, saved_world, need, f"{space.os_reason(e)} ({space.free(path)} free there now)", way)) from e
    finally:  # the converter's pointer, written last beside the checkpoint's own files (fewstep names the tag)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(path, "latest_universal"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    fsync(path)
    return out


def _conversion_failed(path: str, saved_world: int, need: int, what: str, way: str | None = None) -> str:
    """The one line for a conversion that did not fit or failed; `way` out, if not freeing space (a read-only
    checkpoint folder)."""
    return (f"resuming {path} (a full fine-tune saved on {saved_world} ranks) on another world size needs DeepSpeed's "
            f"universal checkpoint, about {space.human(need)} beside it while it is written, and its conversion "
            f"failed: {what}. Nothing was lost: the checkpoint is unchanged. "
            f"{way or 'Free some space and resume again'}, or resume on {saved_world} ranks, which needs no conversion")


def load_universal(engine, path: str) -> None:
    """Load `path/universal` with DeepSpeed's universal loader (module, optimizer state, LR schedule)."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        with space.mapped_loads(engine):
            engine.load_checkpoint(path, tag=UNIVERSAL_DIR, load_module_strict=False, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False


# ---------------------------------------------------------------------------------------------------------------
# Per-rank state: EMA, cursors, RNG
# ---------------------------------------------------------------------------------------------------------------

def _rank_file(path: str, r: int) -> dict:
    return torch.load(os.path.join(path, f"rank{r}.pt"), map_location="cpu", weights_only=False, mmap=True)


def reshard_ema(ema, engine, path: str, saved_world: int) -> None:
    """Fill this rank's EMA shadow from every saved rank's shadow pieces (their fragment maps)."""
    new_map = fragment_map(engine)
    if new_map is None:
        raise ResumeMismatch(f"cannot reshard the EMA into {type(engine.optimizer).__name__}: unknown layout")
    sources, decay = [], None
    for r in range(saved_world):
        state = _rank_file(path, r)
        if state.get("ema") is None or state.get("ema_map") is None:
            raise ResumeMismatch(f"{path}: rank{r}.pt holds no EMA with its parameter map; cannot reshard the EMA")
        sources.append((state["ema_map"], state["ema"]["shadow"]))
        decay = state["ema"]["decay"] if decay is None else decay
    with torch.no_grad():
        for name, (i, hp, lp, n) in new_map.items():
            ema.shadow[i].view(-1)[hp:hp + n].copy_(_piece(sources, name, lp, n))
    ema.decay = float(decay)


def fresh_rng(seed: int, rank: int, step: int) -> dict:
    """RNG states for a rank that did not exist when the checkpoint was written, seeded from (seed, rank, step)."""
    s = int(np.random.SeedSequence([int(seed), int(rank), int(step), 0x5EED]).generate_state(1, np.uint64)[0])
    with rng_streams.isolated():  # the state `rng_streams.seed(s)` gives, without touching this process's stream
        return rng_streams.seed(s)


def composed_rank_state(path: str, rank: int, saved_world: int, seed: int, step: int) -> dict:
    """This rank's state on a new layout: the data/sampler cursors (global positions, so rank 0's; so is any other
    key of the rank files) and the RNG (its own, or fresh for a rank the checkpoint did not have)."""
    base = _rank_file(path, 0)
    if rank < saved_world:
        own = base if rank == 0 else _rank_file(path, rank)
        if own["order"] != base["order"] or own.get("samplers") != base.get("samplers"):
            raise RuntimeError(f"{path}: rank{rank}.pt and rank0.pt disagree about the data position "
                               f"({own['order']} vs {base['order']}); the checkpoint is inconsistent")
        rng = own["rng"]
    else:
        rng = fresh_rng(seed, rank, step)
    shared = {k: v for k, v in base.items() if k not in ("rng", "ema", "ema_map")}  # cursors and any later keys
    return {**shared, "samplers": base.get("samplers", []), "rng": rng}
