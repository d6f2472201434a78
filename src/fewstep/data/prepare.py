"""Small steps of the trainer's data preparation that need no process group: the model's size multiple (from its
VAE config, no weights) and the start-up summary of what the data config produced."""
from __future__ import annotations

from collections import Counter

import torch

from fewstep.data.backends import DataConfig
from fewstep.data.dataset import Sample


def resolution_multiple(adapter, name_or_path: str) -> int:
    """Image sides must be a multiple of this (VAE factor x patch factor), read from the VAE's config: the VAE is
    built on the meta device, so no weights are read."""
    src = adapter.resolve(name_or_path)
    config = adapter.vae_cls.load_config(src, subfolder="vae")
    with torch.device("meta"):
        vae = adapter.vae_cls.from_config(config)
    return adapter.vae_scale_factor(vae) * adapter.patch_factor(None)


def summary(config: DataConfig, samples: list[Sample], skipped: dict[str, Counter]) -> list[str]:
    """One line per image entry: images used, their buckets, the crop rule, and what was skipped and why."""
    lines = []
    for e, entry in enumerate(config.images):
        sizes = Counter(f"{s.plan.target[0]}x{s.plan.target[1]}" for s in samples if s.entry == e)
        buckets = ", ".join(f"{b} x{n}" for b, n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        line = (f"data '{entry.id}': {sum(sizes.values())} images in {len(sizes)} bucket(s) [{buckets}], "
                f"{entry.shown_crop}, repeats {entry.repeats}, probability {entry.probability:g}")
        if skipped.get(entry.id):
            line += "; skipped " + ", ".join(f"{n} {why}" for why, n in skipped[entry.id].items())
        lines.append(line)
    return lines
