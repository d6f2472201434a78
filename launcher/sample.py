#!/usr/bin/env python
"""Sample with fewstep outputs through a stock diffusers pipeline.

  python launcher/sample.py --method glance --slow OUT/glance-slow --fast OUT/glance-fast --prompt "..." --seed 0
  python launcher/sample.py --method twinflow --lora OUT --steps 2 --prompt "..." --seed 0
  python launcher/sample.py --method flow --lora OUT --steps 20 --prompt "..."

The base model is read from the run's fewstep_run.json unless --model is given. Images are written as PNG.
"""
import argparse
import os
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=("glance", "twinflow", "flow"))
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="sample.png", help="PNG path (a suffix -<steps> is added for several steps)")
    p.add_argument("--model", default=None, help="base model (default: from the run's fewstep_run.json)")
    p.add_argument("--slow", help="Glance Slow LoRA directory")
    p.add_argument("--fast", help="Glance Fast LoRA directory")
    p.add_argument("--lora", help="LoRA directory (twinflow/flow), or a full fine-tune output directory")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="sampling steps; twinflow accepts several (e.g. 1 2 4); glance: must equal the list length")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the training resolution)")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.models import anystep, get_adapter
    from fewstep.sampling import flow_sigmas, glance_pipeline_sample, run_info
    from fewstep.schedulers import TwinFlowScheduler

    run_dir = args.slow if args.method == "glance" else args.lora
    if run_dir is None:
        sys.exit("fewstep: " + ("--slow and --fast are required" if args.method == "glance" else "--lora is required"))
    info = run_info(run_dir)
    cfg = info["config"]
    adapter = get_adapter(cfg["model_family"])
    comps = adapter.load(args.model or cfg["pretrained_model_name_or_path"])
    full_dir = os.path.join(run_dir, "transformer")
    if os.path.isdir(full_dir):  # a full fine-tune
        comps.transformer = adapter.transformer_cls.from_pretrained(full_dir)
    pipe = adapter.build_pipeline(comps, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    # Flux's guidance_scale is its distilled-guidance embedding: keep the value trained with (SimpleTuner's port
    # forced 0 there). Elsewhere guidance 0.0 means no CFG, as TwinFlow samples.
    prompt_kwargs = adapter.pipeline_prompt_kwargs(adapter.encode_prompts(comps, [args.prompt]),
                                                   guidance=cfg.get("flux_guidance_value"))
    prompt_kwargs.setdefault("guidance_scale", 0.0)
    res = args.resolution or info.get("resolution") or 32
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
    outputs = []
    if args.method == "glance":
        if args.fast is None:
            sys.exit("fewstep: --fast is required for --method glance")
        slow, fast = info["sigmas"], run_info(args.fast)["sigmas"]
        if slow is None or fast is None:
            sys.exit("fewstep: the Glance directories carry no timestep lists (were they trained with Glance lists?)")
        steps = args.steps[0] if args.steps else None
        img = glance_pipeline_sample(pipe, prompt_kwargs, args.slow, args.fast, slow, fast, num_inference_steps=steps,
                                     height=res, width=res, generator=gen()).images[0]
        outputs.append((args.output, img))
    else:
        if os.path.exists(os.path.join(run_dir, "pytorch_lora_weights.safetensors")):
            pipe.load_lora_weights(run_dir)
        for n in args.steps or ([2] if args.method == "twinflow" else [20]):
            if args.method == "twinflow":
                anystep.add_anystep_embeddings(pipe.transformer, adapter.hook_time_scale)
                anystep.load_anystep(pipe.transformer, run_dir)
                pipe.scheduler = TwinFlowScheduler(num_train_timesteps=1000, prediction_type="flow_matching",
                                                   shift=1.0)
                with anystep.anystep_state(pipe.transformer, tt=0.0, sign=1.0):
                    img = pipe(**prompt_kwargs, num_inference_steps=n, height=res, width=res,
                               generator=gen()).images[0]
            else:
                img = pipe(**prompt_kwargs, sigmas=flow_sigmas(n), num_inference_steps=n, height=res, width=res,
                           generator=gen()).images[0]
            stem, ext = os.path.splitext(args.output)
            outputs.append((f"{stem}-{n}{ext or '.png'}" if len(args.steps or [n]) > 1 else args.output, img))
    for path, img in outputs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        img.save(path)
        print(f"fewstep: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
