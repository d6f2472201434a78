"""The resolution the trainer would train a config at, and where it comes from.

The trainer reads it from the data backend (`fewstep.data.prepare.build_dataset`): `load_data_config` parses the
multidatabackend.json, the config's `resolution`, `resolution_type` and `minimum_image_size` (where set) standing for
an image entry's where it sets none (SimpleTuner's global defaults), and each entry trains at its
`Geometry` (pixel edge, or a megapixel area snapped as SimpleTuner does, rounded to the model's multiple). The planner
runs that same code: it plans at each entry's largest bucket (`largest_bucket`: the square, the largest of its
`crop_aspect_buckets`, or, keeping each image's aspect, the bucket of the widest aspect it admits: with
`resolution_type: pixel` the short side is `resolution`, so a 2:1 image has twice a square's tokens) as the square of
the same area (activation memory follows the token count), and takes the largest entry. Without a
data_backend_config it plans at the config's `resolution`, else at 1024 px; the plan prints which.

Two differences, both about files rather than sizes: the image folders need not exist (the planner reads no image,
and plans are often made where the data is not), and the model's multiple is the real architecture's (VAE /8 times
the adapter's patch factor), not read from a VAE config, since a hub model is not downloaded to plan it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_RESOLUTION = 1024
VAE_FACTOR = 8  # the shipped architectures' VAEs downsample 8x (as `activations` assumes)
PLANNED_ASPECT = 2.0  # aspect-keeping entries without maximum/minimum_aspect_ratio: a 2:1 (or 1:2) image at most


@dataclass(frozen=True)
class Resolution:
    pixels: int  # the square side planned at
    source: str  # where it comes from, for the plan's output


def training_resolution(cfg, adapter) -> Resolution:
    """The training resolution of `cfg` (a validated fewstep Config) for the family `adapter`; a data backend the
    trainer would reject raises its DataError (a ValueError naming the file and entry)."""
    from fewstep.data.backends import ImageEntry, entry_defaults, load_data_config
    from fewstep.data.buckets import Geometry
    from fewstep.data.placeholders import placeholders

    multiple = VAE_FACTOR * adapter.patch_factor(None)
    if cfg.data_backend_config is None:
        if cfg.resolution:
            side = int(cfg.resolution)
            if cfg.resolution_type == "area":  # megapixels, snapped as a data entry's (SimpleTuner's area map)
                side = Geometry(ImageEntry("config", "", cfg.resolution, "area"), multiple).edge
            return Resolution(side, "the config's resolution (no data_backend_config)")
        return Resolution(DEFAULT_RESOLUTION, "the planner's default: the config sets neither resolution nor "
                                              "data_backend_config")
    images = load_data_config(cfg.data_backend_config, entry_defaults(cfg), images_must_exist=False,
                              variables=placeholders(cfg)).images
    (w, h), which, where = max((largest_bucket(Geometry(e, multiple)) + (e.where,) for e in images),
                               key=lambda b: b[0][0] * b[0][1])
    side = 16 * math.ceil(math.sqrt(w * h) / 16)  # the square of (at least) the same area
    source = f"data_backend_config {where}"
    if len(images) > 1:
        source += f" (the largest of {len(images)} image entries)"
    given = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry_defaults(cfg).items()
             if any(k in e.inherited for e in images)]
    if given:
        source += f", with the config's {', '.join(given)} for entries that set none"
    if which != "square":
        source += f"; planned at {which}, {w}x{h} (as a {side}x{side} square: the same tokens)"
    return Resolution(side, source)


def largest_bucket(geometry) -> tuple[tuple[int, int], str]:
    """The largest training size (w, h) an image entry gives any image, and what it is."""
    e, g = geometry.entry, geometry
    if e.crop_aspect == "square":
        return g.square, "square"
    if e.crop_aspect in ("closest", "random"):
        aspects = [b["aspect"] if isinstance(b, dict) else b for b in e.crop_aspect_buckets]
        return max((g.bucket(float(a)) for a in aspects), key=lambda s: s[0] * s[1]), "its largest crop_aspect_bucket"
    lo = e.minimum_aspect_ratio if e.minimum_aspect_ratio is not None else 1 / PLANNED_ASPECT
    hi = e.maximum_aspect_ratio if e.maximum_aspect_ratio is not None else PLANNED_ASPECT
    size, aspect = max(((g.bucket(a), a) for a in (hi, 1.0, lo)), key=lambda s: s[0][0] * s[0][1])
    limit = "its aspect limit" if e.maximum_aspect_ratio is not None or e.minimum_aspect_ratio is not None else \
        "the planner's assumption without maximum_aspect_ratio / minimum_aspect_ratio; wider images need more"
    return size, f"its widest aspect bucket ({aspect:g}, {limit})"
