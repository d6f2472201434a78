"""The training recipes of the digits benchmark and demo: fewstep configs for `launcher/train.py --config`.

One place for every option the teacher, TwinFlow and Glance runs use, so that `run.py` (the benchmark) and `demo.py`
(the README's demo) train with the same recipes and differ only in sizes and step counts.
"""
from __future__ import annotations

import os

TWINFLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                         "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out", "norm1.linear", "norm.linear",
                         "norm_out.linear"]
GLANCE_SLOW_STEPS = (1, 3, 5, 7, 9)  # 1-based steps of the teacher's own 50-step grid
GLANCE_FAST_STEPS = (11, 21, 31, 41, 50)
# twinflow_enhanced_ratio 0: the student learns the teacher's *unguided* distribution, the one the teacher rows are
# sampled from and FD measures (r > 0 trains towards CFG scale 1 + r, up to 1/(1 - r) with the EMA teacher; see
# RESULTS.md and the twinflow_full_cfg ablation). Cosine decay lets the noisy, clamped RCGM targets average out.
TWINFLOW = dict(method="twinflow", use_ema=True, ema_decay=0.99, twinflow_adversarial_enabled=True,
                twinflow_estimate_order=2, twinflow_enhanced_ratio=0.0, twinflow_delta_t=0.01,
                twinflow_target_clamp=1.0, twinflow_target_step_count=1, validation_guidance=0.0,
                caption_dropout_probability=0.1, lr_scheduler="cosine")


def base_config(output_dir: str, pretrained: str, backend: str, cache_dir: str, **kw) -> dict:
    """Options every run shares: the Flux family, fp32, ZeRO-2, no checkpoints or validation, seed 0."""
    return {"model_family": "flux", "pretrained_model_name_or_path": pretrained, "data_backend_config": backend,
            "output_dir": output_dir, "cache_dir": cache_dir, "mixed_precision": "fp32", "zero_stage": 2,
            "checkpointing_steps": 0, "checkpoints_total_limit": 1, "validation_steps": 0, "seed": 0, **kw}


def teacher_config(output_dir: str, base_pipeline: str, backend: str, cache_dir: str, **settings) -> dict:
    """Plain flow matching from random init, full fine-tuning; caption dropout gives the empty prompt a meaning."""
    return base_config(output_dir, base_pipeline, backend, cache_dir, model_type="full", method="flow",
                       caption_dropout_probability=0.1, validation_num_inference_steps=20, **settings)


def twinflow_config(output_dir: str, teacher: str, backend: str, cache_dir: str, *, full: bool, **settings) -> dict:
    """TwinFlow from the teacher pipeline: a full fine-tune, or a LoRA on every linear layer."""
    kind = dict(model_type="full") if full else dict(model_type="lora", lora_targets=TWINFLOW_LORA_TARGETS)
    return base_config(output_dir, teacher, backend, cache_dir, **kind, **TWINFLOW, **settings)


def glance_lists(slow_steps=GLANCE_SLOW_STEPS, fast_steps=GLANCE_FAST_STEPS) -> tuple[list[float], list[float]]:
    """Slow and Fast sigmas at the given 1-based steps (default 1,3,5,7,9 and 11,21,31,41,50) of the teacher's own
    50-step Euler grid."""
    from fewstep.sampling import flow_sigmas

    grid = flow_sigmas(50)
    return [grid[i - 1] for i in slow_steps], [grid[i - 1] for i in fast_steps]


def glance_config(output_dir: str, teacher: str, backend: str, cache_dir: str, **settings) -> dict:
    """Glance (Slow + Fast LoRA, batch 1) on the teacher's 50-step grid: one command trains both phases."""
    slow, fast = glance_lists()
    return base_config(output_dir, teacher, backend, cache_dir, model_type="lora", method="glance",
                       glance_slow_timesteps=slow, glance_fast_timesteps=fast, train_batch_size=1,
                       lr_scheduler="constant_with_warmup", **settings)


def finished(output_dir: str) -> bool:
    """Whether a training run wrote its export (LoRA, full fine-tune or Glance pair)."""
    return any(os.path.exists(os.path.join(output_dir, *sub, "fewstep_run.json"))
               for sub in ((), ("transformer",), ("glance-fast",)))
