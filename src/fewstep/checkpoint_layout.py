"""What fixes a checkpoint's layout, and whether a run with another configuration may resume from it.

Every checkpoint's `trainer.json` records, under `layout`:

    {"method": "twinflow", "family": "flux", "model": "/models/flux-dev", "model_type": "lora",
     "lora": {"rank": 16, "alpha": 64.0, "targets": ["to_k", "to_q", ...]},      (null for model_type full)
     "anystep_embeddings": false, "zero_stage": 2, "world_size": 8, "dtype": "bf16",
     "glance_phase_steps": null,                                                   (max_train_steps for Glance)
     "optimizer": "adamw"}

On resume, `plan` compares it with the new run's. Keys that change what the saved state *is* (family, model, model_type,
LoRA rank / alpha / targets, the method and its any-step embeddings, dtype, Glance's phase length) are refused, all in
one message that names every differing key and says how to proceed. A changed world size, ZeRO stage or optimizer is
resharded where the state allows:

- LoRA runs save their trainable state in a stage-independent form (`trainable.pt`: every trainable parameter's full
  fp32 master and Adam moments by name), so they resume on any stage and any world size, with either optimizer;
- stage 0 keeps its state whole on every rank (no partitioned optimizer files): DeepSpeed's own load takes it on
  any world size;
- full fine-tunes reshard to another world size within one ZeRO stage through DeepSpeed's universal checkpoint;
  a changed stage or optimizer is refused (its optimizer state is far too large to gather, the universal checkpoint
  keeps the stage, and each optimizer's state is DeepSpeed's own format of it);
- the EMA (sharded like the fp32 masters) is resharded from the per-rank parameter maps saved with it.

Checkpoints written before the record existed carry only `world_size` and `zero_stage` in trainer.json: they resume
as before where those match, and reshard where the state they hold allows it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from fewstep.config import ConfigError

TRAINABLE_FILE = "trainable.pt"  # the stage-independent trainable state of LoRA runs


class ResumeMismatch(ConfigError):
    """The checkpoint cannot be resumed with this run's configuration (launcher/train.py prints one line)."""


def run_layout(cfg, adapter, zero_stage: int, world_size: int) -> dict:
    """The layout record of this run (see the module docstring); `zero_stage` as DeepSpeed will run it (the built
    DeepSpeed config's, after a user's `deepspeed_config`), so it is known before anything is loaded."""
    lora = None
    if cfg.model_type == "lora":
        lora = {"rank": int(cfg.lora_rank), "alpha": float(cfg.lora_alpha if cfg.lora_alpha is not None
                                                            else cfg.lora_rank),
                "targets": sorted(cfg.lora_targets or adapter.default_lora_targets)}
    return {"method": cfg.resolved_method, "family": cfg.model_family,
            "model": _model_id(cfg.pretrained_model_name_or_path),
            "model_type": cfg.model_type, "lora": lora, "anystep_embeddings": cfg.resolved_method == "twinflow",
            "zero_stage": int(zero_stage), "world_size": int(world_size),
            "dtype": "bf16" if cfg.bf16 else "fp32",
            "glance_phase_steps": int(cfg.max_train_steps) if cfg.resolved_method == "glance" else None,
            "optimizer": cfg.optimizer}


def _model_id(name: str) -> str:
    """A local directory by its real path (a relative or symlinked spelling is the same model), anything else as is."""
    return os.path.realpath(name) if name and os.path.isdir(name) else name


@dataclass
class Resume:
    """Where to resume from and how: `native` (DeepSpeed's own load: same stage and world size), `trainable` (LoRA
    state from trainable.pt, any stage and world size) or `universal` (DeepSpeed's universal checkpoint: another
    world size, same stage)."""
    path: str
    mode: str = "native"
    saved_world: int = 1
    saved_stage: int | None = None
    changes: list[str] = field(default_factory=list)  # e.g. ["world size 2 -> 1"]
    reshard_ema: bool = False
    step: int = 0  # the optimizer step it was saved at

    @property
    def note(self) -> str:
        if self.mode == "native":
            return f" ({', '.join(self.changes)}: stage-0 state is not partitioned)" if self.changes else ""
        how = {"trainable": f"the LoRA state from {TRAINABLE_FILE}",
               "universal": "DeepSpeed's universal checkpoint"}[self.mode]
        return f" (resharded: {', '.join(self.changes)}; {how})"


# keys that fix what the saved state is: (record path, config key shown to the user)
GLANCE_STEPS = "max_train_steps (Glance: per phase)"
_FIXED = [(("method",), "method"), (("family",), "model_family"), (("model",), "pretrained_model_name_or_path"),
          (("model_type",), "model_type"), (("lora", "rank"), "lora_rank"), (("lora", "alpha"), "lora_alpha"),
          (("lora", "targets"), "lora_targets"), (("anystep_embeddings",), "any-step embeddings (method twinflow)"),
          (("dtype",), "mixed_precision"), (("glance_phase_steps",), GLANCE_STEPS)]


def _get(record, path):
    for k in path:
        if not isinstance(record, dict) or k not in record:
            return _MISSING
        record = record[k]
    return record


_MISSING = object()


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def plan(path: str, meta: dict, new: dict, files: list[str], saved_ema: bool, has_ema_maps: bool,
         use_ema: bool) -> Resume:
    """Compare checkpoint `path` (its trainer.json `meta`) with this run's layout `new`; return how to resume, or raise
    ResumeMismatch naming every key that differs. `files` is the checkpoint's file list, `saved_ema` whether its rank
    files hold an EMA and `has_ema_maps` whether with the parameter maps, `use_ema` whether this run keeps one."""
    old = meta.get("layout") or {}
    legacy = not old  # written before the record existed: only world size and stage are known
    saved_world = int(meta.get("world_size") or old.get("world_size") or _ranks_on_disk(files))
    saved_stage = meta.get("zero_stage", old.get("zero_stage"))
    saved_stage = int(saved_stage) if saved_stage is not None else None
    name = os.path.basename(os.path.normpath(path))
    where = f"resume_from_checkpoint: {name} ('{path}')"

    fixed = []  # (key, saved, now)
    for rec_path, key in _FIXED:
        saved, now = _get(old, rec_path), _get(new, rec_path)
        if saved is _MISSING or now is _MISSING:  # unknown (older record), or LoRA keys of a full fine-tune
            continue
        if saved != now:
            fixed.append((key, saved, now))

    world_changed = saved_world != new["world_size"]
    stage_changed = saved_stage is not None and saved_stage != new["zero_stage"]
    saved_optimizer = old.get("optimizer", new["optimizer"])  # older records: unknown, taken as unchanged
    optimizer_changed = saved_optimizer != new["optimizer"]
    changes = ([f"world size {saved_world} -> {new['world_size']}"] if world_changed else []) + \
        ([f"zero_stage {saved_stage} -> {new['zero_stage']}"] if stage_changed else []) + \
        ([f"optimizer {saved_optimizer} -> {new['optimizer']}"] if optimizer_changed else [])
    lora = new["model_type"] == "lora"
    has_trainable = TRAINABLE_FILE in files
    blockers, reasons, advice = list(fixed), [], []

    if fixed:
        keys = {k for k, _, _ in fixed}
        lora_keys = keys & {"lora_rank", "lora_alpha", "lora_targets"}
        if lora_keys:
            reasons.append("a LoRA of another rank, alpha or target set cannot take over this one's weights and "
                           "optimizer state")
        if keys - lora_keys - {GLANCE_STEPS}:
            reasons.append("the checkpoint holds the state of another model, training mode or precision")
        if GLANCE_STEPS in keys:
            reasons.append("Glance trains Slow for max_train_steps steps, then Fast: which phase a checkpoint's LoRA "
                           "belongs to follows from its step and the max_train_steps it was written with (a "
                           "one-phase run has none)")
            advice.append("to train Glance's LoRAs for more steps, start a new run (another output_dir)")
        advice.append("to train with the new settings instead, start a new run (another output_dir, or no "
                      "resume_from_checkpoint)" + ("; this run's LoRA stays in its export "
                                                   "(pytorch_lora_weights.safetensors) and in this checkpoint, but "
                                                   "fewstep cannot start a LoRA of another shape from it"
                                                   if lora_keys else ""))

    mode = "native"
    partitioned = any("optim_states" in f for f in files)  # ZeRO's per-rank optimizer files (none at stage 0)
    export_advice = (f"export the weights (python {os.path.join(path, 'zero_to_fp32.py')} {path} OUT -t state "
                     "--safe_serialization), make them the transformer of a copy of the base pipeline and start a "
                     "new run from it with pretrained_model_name_or_path (fresh optimizer state)")
    if optimizer_changed and not (lora and has_trainable):
        blockers.append(("optimizer", saved_optimizer, new["optimizer"]))
        reasons.append(("this LoRA checkpoint was written before fewstep saved an optimizer-independent copy of the "
                        f"trainable state ({TRAINABLE_FILE}), and" if lora else "a full fine-tune's") +
                       " optimizer state is saved in its optimizer's own format, which the other one cannot load")
        if not lora:
            advice.append(f"to continue with optimizer {new['optimizer']}, {export_advice}")
    if world_changed or stage_changed or optimizer_changed:
        if lora and has_trainable:
            mode = "trainable"
        elif stage_changed:
            blockers.append(("zero_stage", saved_stage, new["zero_stage"]))
            if lora:
                reasons.append("this LoRA checkpoint was written before fewstep saved a stage-independent copy of "
                               f"the trainable state ({TRAINABLE_FILE}), and DeepSpeed cannot change the ZeRO stage "
                               "of a checkpoint")
            else:
                reasons.append("a full fine-tune's optimizer state is resharded only by DeepSpeed's universal "
                               "checkpoint, which keeps the ZeRO stage (gathering it to change stage would need the "
                               "whole model's fp32 weights and Adam moments in one process)")
                advice.append(f"to continue at zero_stage {new['zero_stage']}, {export_advice}")
        elif saved_stage == 0 and new["zero_stage"] == 0 and not partitioned:
            mode = "native"  # stage-0 state is replicated, not partitioned: any world size loads it
        elif not optimizer_changed:  # (refused above)
            mode = "universal"
    reshard_ema = use_ema and saved_ema and mode != "native"
    if reshard_ema and not has_ema_maps:
        if world_changed:
            blockers.append(("world size", saved_world, new["world_size"]))
        if stage_changed:
            blockers.append(("zero_stage", saved_stage, new["zero_stage"]))
        if optimizer_changed:
            blockers.append(("optimizer", saved_optimizer, new["optimizer"]))
        reasons.append("its EMA partitions were saved without the parameter maps fewstep needs to reshard them "
                       "(a checkpoint from before fewstep could)")

    if blockers:
        keep = ", ".join(f"{k} {_show(s)}" for k, s, _ in _unique(blockers) if k != "world size")
        ranks = f" on {saved_world} rank(s)" if any(k == "world size" for k, _, _ in blockers) else ""
        diff = ", ".join(f"{k} {_show(s)} -> {_show(n)}" for k, s, n in _unique(blockers))
        also = [c for c in changes if not any(c.startswith(k) for k, _, _ in blockers)]
        more = f" ({' and '.join(also)} on its own would be resharded)" if also else ""
        cont = f"to continue it, resume with {keep}{ranks}" if keep else f"to continue it, resume{ranks}"
        if legacy:
            cont += " (this checkpoint predates the layout record: only its world size and ZeRO stage are known)"
        why = "; ".join(_dedupe(reasons))
        raise ResumeMismatch(f"{where} does not fit this run: {diff}{more}. {why[0].upper()}{why[1:]}. "
                             f"{cont[0].upper()}{cont[1:]}" + "".join(f"; {a}" for a in _dedupe(advice)) + ".")
    return Resume(path, mode, saved_world, saved_stage, changes, reshard_ema, int(meta.get("step", 0)))


def _unique(items):
    seen, out = set(), []
    for item in items:
        if item[0] not in seen:
            seen.add(item[0])
            out.append(item)
    return out


def _dedupe(items):
    return list(dict.fromkeys(items))


def _ranks_on_disk(files: list[str]) -> int:
    ranks = [int(f[4:-3]) for f in files if f.startswith("rank") and f.endswith(".pt") and f[4:-3].isdigit()]
    return 1 + max(ranks) if ranks else 1
