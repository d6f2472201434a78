"""The resolution the trainer would train a config at, and where it comes from.

The trainer reads it from the data backend (`fewstep.data.prepare.build_dataset`): `load_data_config` parses the
multidatabackend.json, the config's `resolution` (if set) replacing every image entry's, and each entry trains at its
`Geometry` (pixel edge, or a megapixel area snapped as SimpleTuner does, rounded to the model's multiple). The planner
runs that same code: it plans at the largest entry's square size. Without a data_backend_config it plans at the
config's `resolution`, else at 1024 px; the plan prints which.

Two differences, both about files rather than sizes: the image folders need not exist (the planner reads no image,
and plans are often made where the data is not), and the model's multiple is the real architecture's (VAE /8 times
the adapter's patch factor), not read from a VAE config, since a hub model is not downloaded to plan it.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_RESOLUTION = 1024
VAE_FACTOR = 8  # the shipped architectures' VAEs downsample 8x (as `activations` assumes)


@dataclass(frozen=True)
class Resolution:
    pixels: int  # the square side planned at
    source: str  # where it comes from, for the plan's output


def training_resolution(cfg, adapter) -> Resolution:
    """The training resolution of `cfg` (a validated fewstep Config) for the family `adapter`; a data backend the
    trainer would reject raises its DataError (a ValueError naming the file and entry)."""
    if cfg.data_backend_config is None:
        if cfg.resolution:
            return Resolution(cfg.resolution, "the config's resolution (no data_backend_config)")
        return Resolution(DEFAULT_RESOLUTION, "the planner's default: the config sets neither resolution nor "
                                              "data_backend_config")
    from fewstep.data.backends import load_data_config
    from fewstep.data.buckets import Geometry

    multiple = VAE_FACTOR * adapter.patch_factor(None)
    images = load_data_config(cfg.data_backend_config, cfg.resolution, images_must_exist=False).images
    side, where, entry = max(((Geometry(e, multiple).square[0], e.where, e) for e in images), key=lambda s: s[0])
    source = f"data_backend_config {where}"
    if len(images) > 1:
        source += f" (the largest of {len(images)} image entries)"
    if cfg.resolution:
        source += f", with the config's resolution {cfg.resolution} applied to every entry"
    if not (entry.crop and entry.crop_aspect == "square"):
        source += "; planned at its square size (its aspect buckets vary per image)"
    return Resolution(side, source)

