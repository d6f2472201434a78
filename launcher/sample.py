#!/usr/bin/env python
"""Sample with fewstep outputs through a stock diffusers pipeline.

  python launcher/sample.py --method glance --slow OUT/glance-slow --fast OUT/glance-fast --prompt "..." --seed 0
  python launcher/sample.py --method twinflow --lora OUT --steps 2 --prompt "..." --seed 0
  python launcher/sample.py --method flow --lora OUT --steps 20 --prompt "..."
  python launcher/sample.py ... --device cuda:1 --dtype fp32 --offload model --json timings.json
  python launcher/sample.py --method glance ... --cfg-scale 5 --negative-prompt " "     # Qwen-Image's default

The base model is read from the run's fewstep_run.json unless --model is given; the method must be the one the run
trained (a Glance Slow or Fast LoRA alone also samples as --method flow; two flow runs trained on a Slow and a Fast
`flow_custom_timesteps` list, SimpleTuner's two-run Glance, chain as --method glance; such a run alone samples as
--method flow as its validation did: its LoRA at its listed sigmas, the base model elsewhere; an EMA export, OUT/ema,
samples like OUT). Images are written in the format of
--output's extension (PNG without one), checked before anything loads, as is the folder they go in.
Device and precision: --device defaults to cuda when torch sees a GPU, else cpu; --dtype to bf16 on such a GPU, else
fp32. --offload model|sequential keeps the weights in CPU memory and lets diffusers move them to the GPU as needed
(for pipelines that do not fit; needs accelerate; nothing to do on --device cpu). All noise (the start noise and
TwinFlow's stochastic steps) is drawn on the CPU in fp32 from --seed, so a seed gives the same noise on every device
and dtype (whatever the torch version: before 2.13 its CPU bf16 normals are another stream). A mistake (unknown
dtype, a GPU asked for that is not there, a directory that is no fewstep export, a number out of range) ends in one
`fewstep: ...` line and exit status 2.
"""
import argparse
import json
import os
import sys
import time

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its import-time notices (torchvision) are not for our users

from fewstep.cli import OneLineParser  # noqa: E402
from fewstep.sample_checks import (check_method_options, check_numbers, check_writable,  # noqa: E402
                                   model_resolution, output_paths)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__)
    p.add_argument("--method", required=True, choices=("glance", "twinflow", "flow"))
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="sample.png",
                   help="image path, PNG without an extension (a suffix -<steps> is added for several steps)")
    p.add_argument("--model", default=None, help="base model (default: from the run's fewstep_run.json)")
    p.add_argument("--slow", help="Glance Slow LoRA directory")
    p.add_argument("--fast", help="Glance Fast LoRA directory")
    p.add_argument("--lora", help="LoRA directory (twinflow/flow), or a full fine-tune output directory")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="sampling steps; twinflow accepts several (e.g. 1 2 4); glance: must equal the list length")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels, rounded down to the model's multiple (default: the training resolution)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on cpu)")
    p.add_argument("--offload", default="none", choices=("none", "model", "sequential"),
                   help="diffusers CPU offload for pipelines that do not fit on the GPU: model (whole models in turn) "
                        "or sequential (submodule by submodule: least memory, slowest)")
    p.add_argument("--target-time", default=None, choices=("few", "any", "mul"),
                   help="twinflow: each step's target time tt: few (0: jump to data, re-noise), any (the next sigma), "
                        "mul (the current sigma: plain flow). Default: the preset for the step count")
    p.add_argument("--stochastic-ratio", type=float, default=None,
                   help="twinflow: share of fresh noise when re-noising (1: all fresh, 0: Euler). Default: preset")
    p.add_argument("--gap-end", type=float, default=None, help="twinflow: end gap of the sigma grid. Default: preset")
    p.add_argument("--kumaraswamy", type=float, nargs=3, default=None, metavar=("A", "B", "C"),
                   help="twinflow: time warp of the sigma grid (1 1 1: none). Default: preset")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance with --negative-prompt (1: none; 2x the model calls). Default: none "
                        "for twinflow (its target distils guidance); for glance and flow the family's: Qwen-Image 5 "
                        "(as Glance's reference), others none")
    p.add_argument("--negative-prompt", default=None,
                   help="the prompt CFG steers away from (default ' '; SDXL: '', which it encodes as zeros)")
    p.add_argument("--warmup", type=int, default=0, help="untimed pipeline calls before the timed ones")
    p.add_argument("--json", default=None, help="also write device, dtype, load and per-image times to this file")
    return p


def check_twinflow_grid(steps: int, args) -> None:
    """The TwinFlow sampler for `steps` NFE builds its sigma grid (before anything loads): the options can be valid
    one by one and still collapse the grid (e.g. --gap-end 0.99 at 8 steps, --kumaraswamy 1000 1 1)."""
    from fewstep.sampling import SamplingError
    from fewstep.schedulers.twinflow import default_gap_end

    scheduler = twinflow_scheduler(steps, args)
    try:
        scheduler.set_timesteps(steps)
    except ValueError:
        gap_end, kumaraswamy = scheduler.config.gap_end, scheduler.config.kumaraswamy
        gap_end = default_gap_end(steps) if gap_end is None else gap_end
        raise SamplingError(f"the TwinFlow sigma grid for {steps} steps (gap end {gap_end:g}, Kumaraswamy "
                            f"{' '.join(f'{k:g}' for k in kumaraswamy)}) collapses: its sigmas must be distinct, in "
                            "(0, 1]; change --gap-end or --kumaraswamy") from None


def export_adapter(run_dir: str, cfg: dict):
    """The model adapter for the family the run's config names."""
    from fewstep.models import get_adapter
    from fewstep.sampling import RUN_INFO, SamplingError

    try:
        adapter = get_adapter(cfg.get("model_family"))
    except ValueError as e:
        raise SamplingError(f"{os.path.join(run_dir, RUN_INFO)}: {e}") from None
    adapter.model_option = "--model"  # the run fixed the family: a base model of another one is fixed with --model
    return adapter


def twinflow_scheduler(steps: int, args, base_config=None, prediction_type: str = "flow_matching"):
    """The TwinFlow sampler for `steps` NFE: the measured preset (`twinflow_preset`), with the CLI's overrides.

    base_config / prediction_type: for a diffusion base (SDXL), its folder's scheduler config (the betas) and
    'epsilon' / 'v_prediction': the scheduler then scales the UNet's input and converts its output (diff2flow)."""
    from fewstep.schedulers.twinflow import twinflow_sampler

    overrides = {key: getattr(args, key) for key in ("target_time", "stochastic_ratio", "gap_end", "kumaraswamy")
                 if getattr(args, key, None) is not None}
    if "kumaraswamy" in overrides:
        overrides["kumaraswamy"] = tuple(overrides["kumaraswamy"])
    try:
        return twinflow_sampler(steps, base_config, prediction_type, **overrides)
    except ValueError as e:
        from fewstep.sampling import SamplingError
        raise SamplingError(str(e)) from None


def step_drawing_from(scheduler, gen: torch.Generator):
    """`scheduler.step` whose stochastic steps draw from `gen` unless the pipeline passes a generator of its own.
    SDXL's pipeline passes `generator=None` to every scheduler whose `step` takes one: a `functools.partial` default
    would be overridden by it, and the noise would come from the global RNG, not `--seed`."""
    def step(*args, generator=None, **kwargs):
        return type(scheduler).step(scheduler, *args, generator=gen if generator is None else generator, **kwargs)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(args, cpu_offload_hooks: bool = False) -> dict:
    """Load, place and run the pipeline for parsed `args`; writes the images and returns the timing record.

    cpu_offload_hooks: with --device cpu, apply --offload anyway (accelerate's hooks with the CPU as execution device:
    the offload code path without a GPU, for tests) instead of dropping it.
    """
    from fewstep.methods.glance import glance_schedule
    from fewstep.sampling import (SamplingError, anystep_dir, check_export, dtype_name, resolve_device, resolve_dtype,
                                  run_info)

    check_method_options(args)
    check_numbers(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    offload = args.offload
    if offload != "none" and device.type == "cpu" and not cpu_offload_hooks:
        print(f"fewstep: --offload {offload} does nothing on --device cpu (the weights are in CPU memory already); "
              "sampling without it", file=sys.stderr)
        offload = "none"
    run_dir, run_option = (args.slow, "--slow") if args.method == "glance" else (args.lora, "--lora")
    if run_dir is None or (args.method == "glance" and args.fast is None):
        raise SamplingError("--slow and --fast are required for --method glance" if args.method == "glance"
                            else f"--lora is required for --method {args.method}")
    info = run_info(run_dir, run_option)
    cfg = info["config"]
    adapter = export_adapter(run_dir, cfg)
    if adapter.diffusion_base and args.method != "twinflow":  # the stock pipeline's scheduler is a diffusion one
        raise SamplingError(f"--method {args.method}: a {adapter.family} run samples with --method twinflow (a "
                            "diffusion base trains TwinFlow only, through diff2flow)")
    exports = {"--slow": (args.slow, info), "--fast": (args.fast, run_info(args.fast, "--fast"))} \
        if args.method == "glance" else {"--lora": (run_dir, info)}
    for option, (directory, export_info) in exports.items():
        check_export(option, directory, export_info, args.method, adapter.denoiser_subfolder)
    if args.method == "glance":
        slow, fast = info.get("sigmas"), exports["--fast"][1].get("sigmas")
        if slow is None or fast is None:
            raise SamplingError("the Glance directories carry no timestep lists (were they trained with Glance "
                                "lists?)")
        fast_cfg = exports["--fast"][1]["config"]  # the pair shares one base: the Slow run's is loaded
        if fast_cfg.get("model_family") != cfg.get("model_family"):
            raise SamplingError(f"--slow {args.slow} is a {cfg.get('model_family')} run, --fast {args.fast} a "
                                f"{fast_cfg.get('model_family')} one: a Glance pair's LoRAs share one base model")
        if fast_cfg.get("pretrained_model_name_or_path") != cfg.get("pretrained_model_name_or_path") and not args.model:
            print(f"fewstep: note: --fast {args.fast} was trained on {fast_cfg.get('pretrained_model_name_or_path')}"
                  f", --slow on {cfg.get('pretrained_model_name_or_path')}: sampling loads the latter (--model "
                  "picks another)", file=sys.stderr)
        if 0 in fast and set(fast) != {0}:  # flow_custom_timesteps takes a 0 (a Fast run's list given down to it)
            print(f"fewstep: note: --fast {args.fast} was trained down to sigma 0, the end of sampling, where no step "
                  "is taken: its steps are the list's others", file=sys.stderr)
        try:
            n_glance = len(glance_schedule(slow, fast)[0]) - 1
        except ValueError as e:  # a Slow and a Fast export of runs with lists that do not chain
            raise SamplingError(f"--slow {args.slow} and --fast {args.fast}: {e}") from None
        if args.steps and (len(args.steps) != 1 or args.steps[0] != n_glance):
            raise SamplingError(f"--steps for Glance must be the Slow+Fast list length, {n_glance}")
        steps_list = [n_glance]
    else:
        steps_list = args.steps or ([2] if args.method == "twinflow" else [20])
    if args.method == "twinflow":  # sampler settings checked before anything loads
        for n in steps_list:
            check_twinflow_grid(n, args)
    outputs = output_paths(args.output, steps_list)
    if args.json:
        check_writable("--json", args.json, args.json)

    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.models import anystep
    from fewstep.methods.flow_matching import schedule_shift
    from fewstep.sampling import (flow_sigmas, glance_pipeline_sample, listed_pipeline_sample, load_glance_loras,
                                  load_lora, place_pipeline)

    model = args.model or cfg["pretrained_model_name_or_path"]
    res = model_resolution(args.resolution or info.get("resolution") or 32, adapter, model)
    t_load = time.perf_counter()
    comps = adapter.load(model, dtype=dtype)
    full = cfg.get("model_type", "lora") == "full"
    if full:
        comps.denoiser = adapter.denoiser_cls.from_pretrained(os.path.join(run_dir, adapter.denoiser_subfolder),
                                                              dtype=dtype)
    base = {}  # a diffusion base: the TwinFlow scheduler bridges its UNet (input scale, timestep, output conversion)
    if adapter.diffusion_base:
        note = adapter.use_prediction_type(cfg.get("prediction_type") or adapter.prediction_type, comps.source)
        if note:  # as training logged it: the run's type wins over the folder's
            print(f"fewstep: warning: {note}", file=sys.stderr)
        base = dict(base_config=comps.scheduler.config, prediction_type=adapter.prediction_type)
    pipe = adapter.build_pipeline(comps, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    denoiser = getattr(pipe, adapter.denoiser_subfolder)
    # Every weight is loaded in CPU memory before the pipeline is placed: LoRAs, any-step embeddings (created in the
    # transformer's dtype and moved with it), Glance's two adapters.
    if args.method == "glance":
        load_glance_loras(pipe, args.slow, args.fast)
    elif not full:
        load_lora(pipe, run_dir)
    if args.method == "twinflow":
        adapter.add_anystep(denoiser)
        anystep.load_anystep(denoiser, anystep_dir(run_dir, adapter.denoiser_subfolder))
        pipe.scheduler = twinflow_scheduler(steps_list[0], args, **base)
    place_pipeline(pipe, device, offload)
    # Flux's guidance_scale is its distilled-guidance embedding: keep the value trained with (SimpleTuner's port
    # forced 0 there); the pipeline's CFG argument is set for every family (1: off, as TwinFlow samples).
    cfg_scale = args.cfg_scale or (1.0 if args.method == "twinflow" else adapter.sample_cfg_scale)
    if args.negative_prompt is None:  # validation's default too
        args.negative_prompt = adapter.default_negative_prompt
    negative = adapter.encode_prompts(comps, [args.negative_prompt]) if cfg_scale > 1 else None
    prompt_kwargs = adapter.pipeline_prompt_kwargs(adapter.encode_prompts(comps, [args.prompt]), negative,
                                                   guidance=cfg.get("flux_guidance_value"))
    prompt_kwargs.update(adapter.pipeline_cfg_kwargs(cfg_scale))  # 1: off (Qwen-Image's pipeline default is 4)
    _sync(device)
    load_s = time.perf_counter() - t_load

    def generate(n):
        gen = torch.Generator().manual_seed(args.seed)  # CPU noise, fp32: the same on every device and dtype
        noise = adapter.start_noise(comps, 1, res, res, gen)
        start = adapter.pipeline_latent_kwargs(comps, noise.to(dtype))
        if args.method == "glance":
            return glance_pipeline_sample(pipe, prompt_kwargs, None, None, slow, fast, **start).images[0]
        if args.method == "twinflow":  # its stochastic steps draw from gen too (the pipeline passes no generator)
            pipe.scheduler = twinflow_scheduler(n, args, **base)
            pipe.scheduler.step = step_drawing_from(pipe.scheduler, gen)
            # each forward takes t and tt from the scheduler's current step (its target_time mode)
            with anystep.anystep_state(denoiser, sign=1.0, scheduler=pipe.scheduler):
                return pipe(**prompt_kwargs, num_inference_steps=n, **start).images[0]
        shift = schedule_shift(*noise.shape[-2:], cfg.get("flow_schedule_shift", 1.0),
                               cfg.get("flow_schedule_auto_shift", False))  # as the run trained and validated
        if info.get("sigmas"):  # trained on a timestep list alone: the LoRA there, the base model elsewhere
            return listed_pipeline_sample(pipe, prompt_kwargs, info["sigmas"], flow_sigmas(n, shift),
                                          **start).images[0]
        return pipe(**prompt_kwargs, sigmas=flow_sigmas(n, shift), num_inference_steps=n, **start).images[0]

    for _ in range(args.warmup):
        generate(steps_list[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for n, path in zip(steps_list, outputs):
        _sync(device)
        t0 = time.perf_counter()
        img = generate(n)
        _sync(device)
        seconds = time.perf_counter() - t0
        try:
            img.save(path)
        except OSError as e:  # checked before the load; a disk that filled up since, say
            raise SamplingError(f"--output {path}: cannot write it ({e.strerror or e})") from None
        print(f"fewstep: wrote {path} ({n} steps, {seconds:.3f} s)")
        runs.append({"steps": n, "seconds": seconds, "output": path})
    return {"method": args.method, "family": adapter.family, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": dtype_name(dtype), "offload": offload, "resolution": res, "load_s": load_s, "warmup": args.warmup,
            "cfg_scale": cfg_scale, "runs": runs,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    from fewstep.engine.host_memory import DEFAULT_THRESHOLD, fix_mmap_threshold
    from fewstep.errors import UserError

    fix_mmap_threshold(DEFAULT_THRESHOLD)  # as the trainer: offloaded weights moving to and fro are freed on the host

    try:
        record = sample(args)
        if args.json:
            write_json(args.json, record)
    except UserError as e:
        if os.environ.get("FEWSTEP_DEBUG") == "1":
            raise
        print(f"fewstep: {e}", file=sys.stderr)
        return 2
    return 0


def write_json(path: str, record: dict) -> None:
    from fewstep.sampling import SamplingError

    try:
        with open(path, "w") as fh:
            json.dump(record, fh, indent=1)
    except OSError as e:
        raise SamplingError(f"--json {path}: cannot write it ({e.strerror or e})") from None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
