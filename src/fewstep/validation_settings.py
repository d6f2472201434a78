"""What validation renders, as rules over the config and the family's adapter: its size, its guidance, its prompt and
its negative prompt. `fewstep.validation` samples with them; `fewstep.data.prepare` reads them to cache the prompts
validation will encode."""
from __future__ import annotations

import re
from typing import Any, Optional

SIDE_MAX = 8192  # pixels: a validation image side beyond this is a typo


def validation_size(value: Any) -> Optional[tuple[int, int]]:
    """`validation_resolution` as (width, height) in pixels: 'WIDTHxHEIGHT' (SimpleTuner's spelling), or one side (a
    number or its text) for a square; None where it is not set. Raises ValueError saying what was expected."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if re.fullmatch(r"1(\.0*)?", text):  # SimpleTuner reads 1 (megapixel) as 1024 x 1024
        return 1024, 1024
    megapixels = re.fullmatch(r"\d*\.\d+", text) or (re.fullmatch(r"\d+", text) and int(text) < 128)
    if not isinstance(value, bool) and megapixels:
        raise ValueError(f"'validation_resolution' {value!r} reads as megapixels in SimpleTuner; give the side in "
                         "pixels (e.g. 1024)")
    if isinstance(value, bool) or not re.fullmatch(r"\d+(x\d+)?", text):
        several = " (one size: SimpleTuner's list of several sizes is not supported)" if "," in text else ""
        raise ValueError(f"'validation_resolution' must be WIDTHxHEIGHT or one side in pixels, e.g. '1024x768' or "
                         f"1024; got {value!r}{several}")
    w, _, h = text.partition("x")
    size = (int(w), int(h or w))
    if not all(8 <= side <= SIDE_MAX for side in size):
        raise ValueError(f"'validation_resolution' {value!r}: each side must be 8 to {SIDE_MAX} pixels")
    return size


def validation_cfg_scale(cfg, adapter) -> float:
    """Classifier-free guidance of validation images (1: none): `validation_guidance`, or for a guidance-distilled
    family (FLUX) `validation_guidance_real` (SimpleTuner's meanings); by default the family's (as
    launcher/sample.py: Qwen-Image 5); TwinFlow never (its target distils guidance)."""
    if cfg.resolved_method == "twinflow":
        return 1.0
    given = cfg.validation_guidance_real if adapter.distilled_guidance else cfg.validation_guidance
    return max(float(adapter.sample_cfg_scale if given is None else given), 1.0)


def validation_distilled_guidance(cfg, adapter) -> Optional[float]:
    """The distilled-guidance value of validation images (FLUX: `validation_guidance`; None: the training value).
    TwinFlow samples at the training value."""
    if cfg.resolved_method == "twinflow" or not adapter.distilled_guidance:
        return None
    return cfg.validation_guidance


NAME_MAX = 100  # characters of a prompt's nickname in file names (file systems allow 255 bytes a name)


def library_prompts(cfg) -> list[tuple[str, str]]:
    """`user_prompt_library`'s (name, prompt) pairs in the file's order, each name made safe for a file name
    (SimpleTuner's nicknames may hold '<token>'), short, and unique whatever the file system's case rules; [] without
    a library. An entry is a prompt, or SimpleTuner's object form with its "prompt" alone. Raises ValueError naming
    the file."""
    if cfg.user_prompt_library is None:
        return []
    from fewstep.jsonfile import load_json
    where = f"user_prompt_library {cfg.user_prompt_library}"
    library = load_json(cfg.user_prompt_library, ValueError, "user_prompt_library")
    if not isinstance(library, dict) or not library:
        raise ValueError(f"{where}: expected a JSON object of nickname -> prompt, as SimpleTuner's")
    out, seen = [], set()
    for nickname, entry in library.items():
        if isinstance(entry, dict):
            others = sorted(set(entry) - {"prompt"})
            if others:
                raise ValueError(f"{where}: entry {nickname!r} sets {', '.join(others)}: fewstep reads an entry's "
                                 "prompt alone (each renders with the trained weights as they are)")
            entry = entry.get("prompt")
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{where}: entry {nickname!r} must be a prompt (non-empty text), got {entry!r}")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nickname).strip("_.")[:NAME_MAX] or "prompt"
        base, n = name, 1
        while name.lower() in seen:
            n += 1
            name = f"{base}_{n}"
        seen.add(name.lower())
        out.append((name, entry))
    return out


def validation_prompts(cfg, ds, adapter) -> tuple[str, str]:
    """The validation prompt (default: the first training caption) and the negative one of its classifier-free
    guidance (`validation_negative`); both were cached with the data set (`fewstep.data.prepare`)."""
    prompt = cfg.validation_prompt if cfg.validation_prompt is not None else ds.samples[0].caption
    return prompt, validation_negative(cfg, adapter)


def validation_negative(cfg, adapter) -> str:
    """Validation's negative prompt: `validation_negative_prompt`, or where validation guides the family's default
    (launcher/sample.py's); without guidance, the empty prompt (cached anyway: nothing more to encode)."""
    if cfg.validation_negative_prompt is not None:  # "" included, as sample.py's --negative-prompt ""
        return cfg.validation_negative_prompt
    return adapter.default_negative_prompt if validation_cfg_scale(cfg, adapter) > 1 else ""
