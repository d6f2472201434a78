"""A phase's export, the end of a training phase: its weights (LoRA or full) and its EMA weights, each marked complete
by its run info, and the check that keeps non-finite weights out of every checkpoint and export.
"""
from __future__ import annotations

import os

from fewstep.config import Config
from fewstep.engine import distributed, nonfinite
from fewstep.engine.deepspeed_engine import weights_swapped_in
from fewstep.errors import NonFiniteStop
from fewstep.full_export import export_full
from fewstep.lora import export_lora, remove_run_info, run_info_matches, write_run_info
from fewstep.metrics import log_main
from fewstep.steps import Phase


def require_finite_weights(params, what: str) -> None:
    """Nothing non-finite is ever written: every rank checks its weights, all agree (collective)."""
    if distributed.any_rank(not nonfinite.local_weights_finite(params)):
        raise NonFiniteStop(f"the trained weights are non-finite: {what} not written (earlier checkpoints and "
                            "exports are intact)")


def export_dir(cfg: Config, phase: Phase) -> str:
    return os.path.join(cfg.output_dir, phase.export_subdir) if phase.export_subdir else cfg.output_dir


def phase_exported(cfg: Config, phase: Phase, step: int) -> bool:
    """Whether the phase's export finished (its run info, written last, names this phase and step); rank 0 reads."""
    done = None
    if distributed.rank() == 0:
        done = run_info_matches(export_dir(cfg, phase), phase.name, step)
    return distributed.broadcast_object(done)


def export_phase(cfg: Config, adapter, engine, transformer, ema, phase: Phase, step: int, resolution: int,
                 is_main: bool) -> None:
    """Write the phase's weights (LoRA or full) and, with an EMA, the EMA weights under `<out>/ema` (collective).

    The run info (`fewstep_run.json`) is removed first and written last, so it marks a complete export: a run
    interrupted anywhere in between exports again when it resumes (see `phase_exported`). The EMA export gets its own
    (`"ema": true`), so that `launcher/sample.py` samples `<out>/ema` as it samples `<out>`."""
    out = export_dir(cfg, phase)
    info = {"sigmas": phase.sigmas, "phase": phase.name, "step": step, "resolution": resolution}
    with distributed.uneven_work("export run info"):  # rank 0's files: a failure reaches every rank
        if is_main:
            remove_run_info(out)
            remove_run_info(os.path.join(out, "ema"))
    formats = cfg.lora_export_formats
    export = (lambda d: export_lora(adapter, transformer, d, is_main, formats)) if cfg.model_type == "lora" else \
        (lambda d: export_full(transformer, os.path.join(d, adapter.denoiser_subfolder), is_main))
    trained = [p for p in transformer.parameters() if p.requires_grad]
    require_finite_weights(trained, f"export {out}")
    export(out)
    if ema is not None and not ema.frozen:  # the EMA weights, same format, under <out>/ema
        with weights_swapped_in(engine, ema.shadow):
            require_finite_weights(trained, f"EMA export {out}/ema")
            export(os.path.join(out, "ema"))
    with distributed.uneven_work("export run info"):
        if is_main and ema is not None and not ema.frozen:
            write_run_info(os.path.join(out, "ema"), cfg, {**info, "ema": True})
        if is_main:
            write_run_info(out, cfg, info)
    log_main(is_main, f"{phase.name}: exported to {out}")
