"""launcher/sample.py's checks of its command line, made before any model loads: options another --method reads,
each number's range, the resolution against the model's multiple, and where the images (and --json) go. A mistake
is a `fewstep.sampling.SamplingError` naming the option and the value.
"""
import inspect
import math
import os
import sys

RESOLUTION_MAX = 8192  # pixels a side: above this the latents alone outgrow a GPU (and the model's training range)


def check_method_options(args) -> None:
    """Options another method reads, given with this one, are refused by name rather than silently unused; so is a
    step count given twice (it would write the same image twice)."""
    from fewstep.sampling import SamplingError

    given = {"--target-time": args.target_time, "--stochastic-ratio": args.stochastic_ratio,
             "--gap-end": args.gap_end, "--kumaraswamy": args.kumaraswamy}
    unused = [o for o, v in given.items() if v is not None] if args.method != "twinflow" else []
    unused += [o for o, v in (("--slow", args.slow), ("--fast", args.fast)) if v is not None and args.method != "glance"]
    unused += ["--lora"] if args.lora is not None and args.method == "glance" else []
    if unused:
        reads = {"--lora": "twinflow and flow", "--slow": "glance", "--fast": "glance"}
        raise SamplingError(f"{', '.join(unused)} not used by --method {args.method} ("
                            + "; ".join(f"{o}: {reads.get(o, 'twinflow')}" for o in unused) + ")")
    if args.steps and len(set(args.steps)) != len(args.steps):
        raise SamplingError(f"--steps {' '.join(map(str, args.steps))}: a step count is given twice")


def check_numbers(args) -> None:
    """Each numeric option on its own, before anything loads (argparse checked the types): a value out of range is a
    SamplingError naming the option, the value and what it takes. launcher/sample.py's `check_twinflow_grid` checks
    the sigma grid the sampler options make together, `model_resolution` the resolution against the model."""
    from fewstep.config import SEED_MAX
    from fewstep.sampling import SamplingError
    from fewstep.schedulers import TwinFlowScheduler

    gap_start = inspect.signature(TwinFlowScheduler).parameters["gap_start"].default  # the grid's start, u = 0.001
    rules = [
        ("--steps", args.steps, lambda n: n >= 1, "integers >= 1"),
        ("--resolution", args.resolution, lambda r: 1 <= r <= RESOLUTION_MAX,
         f"a number of pixels from 1 to {RESOLUTION_MAX}"),
        ("--seed", args.seed, lambda s: 0 <= s <= SEED_MAX, f"an integer from 0 to 2**64 - 1 ({SEED_MAX})"),
        ("--warmup", args.warmup, lambda n: n >= 0, "an integer >= 0"),
        ("--cfg-scale", args.cfg_scale, lambda s: 1 <= s < math.inf, "a number >= 1 (1: no CFG)"),
        ("--stochastic-ratio", args.stochastic_ratio, lambda s: 0 <= s <= 1, "a number in [0, 1]"),
        ("--gap-end", args.gap_end, lambda g: 0 <= g < 1 - gap_start,
         f"a number in [0, {1 - gap_start:g}) (the sigma grid runs from u = {gap_start:g} to 1 - gap_end)"),
        ("--kumaraswamy", args.kumaraswamy, lambda k: 0 < k < math.inf, "three positive finite numbers A B C"),
    ]
    for option, value, ok, expected in rules:
        bad = [v for v in (value if isinstance(value, list) else [value]) if v is not None and not ok(v)]
        if bad:
            raise SamplingError(f"{option}: got {' '.join(map(str, bad))}, expected {expected}")


def model_resolution(res: int, adapter, model: str) -> int:
    """`res` rounded down to the model's multiple (VAE x patch factor, from its VAE config: no weights are read), as
    training buckets are; a SamplingError below it."""
    from fewstep.data.prepare import resolution_multiple
    from fewstep.sampling import SamplingError

    m = resolution_multiple(adapter, model)
    if res < m:
        raise SamplingError(f"--resolution: got {res}, expected at least {m} (sides are a multiple of {m} for "
                            f"{adapter.family})")
    if res % m:
        print(f"fewstep: --resolution {res} is not a multiple of {m}: sampling at {res // m * m}", file=sys.stderr)
    return res // m * m


def output_paths(output: str, steps_list: list[int]) -> list[str]:
    """Where each image goes: `output`, with a suffix -<steps> for several step counts (no extension: PNG). Checked
    before anything loads: it must name a file, not a folder (one that exists, or a name ending in a separator), PIL
    must write the extension, and its folder must be one that can be made and written."""
    from PIL import Image

    from fewstep.sampling import SamplingError

    if os.path.isdir(output) or output.endswith((os.sep, os.altsep or os.sep)):
        raise SamplingError(f"--output {output} is a directory: give a file name such as "
                            f"{os.path.join(output, 'sample.png')}")
    stem, ext = os.path.splitext(output)
    Image.init()
    if ext and Image.registered_extensions().get(ext.lower()) not in Image.SAVE:
        writable = sorted(e for e, f in Image.registered_extensions().items() if f in Image.SAVE)
        raise SamplingError(f"--output {output}: PIL writes no {ext!r} images (it writes {', '.join(writable[:12])}, "
                            "...)")
    paths = [f"{stem}-{n}{ext or '.png'}" for n in steps_list] if len(steps_list) > 1 else [stem + (ext or ".png")]
    for path in paths:
        check_writable("--output", output, path)
    return paths


def check_writable(option: str, given: str, path: str) -> None:
    """`path` (where `option`'s value `given` writes) can be written: not a folder, and its folder created now (before
    the model loads) and writable."""
    from fewstep.sampling import SamplingError

    if os.path.isdir(path):
        raise SamplingError(f"{option} {given}: {path} is a folder, not a file")
    folder = existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SamplingError(f"{option} {given}: {existing} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        why = "a link to nothing" if os.path.islink(e.filename or "") else e.strerror or str(e)
        raise SamplingError(f"{option} {given}: cannot create the folder {e.filename or folder} ({why})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SamplingError(f"{option} {given}: no permission to write in {folder}")
