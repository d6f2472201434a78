"""Image/caption samples from SimpleTuner's multidatabackend.json, each with the plan of its training pixels.

`collect_samples` reads every enabled image entry (`fewstep.data.backends`), finds its images and captions
(`fewstep.data.captions`), and gives each image its bucket, resize and crop (`fewstep.data.buckets`), skipping the
images SimpleTuner's size and aspect limits leave out. The resumable order over the result is
`fewstep.data.order.DataOrder`.

A fewstep entry like `{"backend": "simple", "resolution": 1024, "shuffle": true, "image_dir": "data",
"caption_extension": ".txt"}` still means what it always did: images paired with captions by file stem, resized
(short side) and centre-cropped to a `resolution` square; one pair is a valid dataset.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from fewstep.data.backends import DataConfig, ImageEntry, load_data_config
from fewstep.data.buckets import Geometry, Plan, content_digest, image_size, load_planned
from fewstep.data.captions import IMAGE_EXTENSIONS, find_captioned_images
from fewstep.data.errors import DataError
from fewstep.data.order import DataOrder, Layout, Stream

__all__ = ["DataError", "DataOrder", "Sample", "Backend", "load_backends", "find_samples", "load_image",
           "collect_samples", "build_layout", "IMAGE_EXTENSIONS"]

Backend = ImageEntry  # the name this type had before SimpleTuner's keys were read


@dataclass
class Sample:
    image_path: str
    caption: str                                       # the first caption (the default validation prompt)
    captions: list[str] = field(default_factory=list)  # every caption of the image ([] means [caption])
    entry: int = 0                                     # index of its image entry
    plan: Optional[Plan] = None                        # its bucket, resize and crop
    digest: str = ""                                   # content hash of the image file

    def __post_init__(self):
        self.captions = self.captions or [self.caption]


def load_backends(path: str, resolution_override: Optional[int] = None) -> list[ImageEntry]:
    """The enabled image entries of a multidatabackend.json (see `fewstep.data.backends.load_data_config`)."""
    return load_data_config(path, resolution_override).images


def find_samples(entry: ImageEntry) -> list[Sample]:
    """The entry's images with their captions (no sizes yet), each `repeats` + 1 times."""
    found = [Sample(path, caps[0], caps) for path, caps in find_captioned_images(entry)]
    return found * (entry.repeats + 1)


def load_image(path: str, resolution: int, multiple: int) -> torch.Tensor:
    """fewstep's default cut: resize the short side to `resolution`, centre-crop a square; [3, R, R] in [-1, 1]."""
    if resolution % multiple:
        raise DataError(f"resolution {resolution} must be a multiple of {multiple} for this model "
                        f"(VAE factor x patch size); try {resolution - resolution % multiple or multiple}")
    entry = ImageEntry(id="image", image_dir=os.path.dirname(path), resolution=float(resolution))
    plan = Geometry(entry, multiple).plan(*image_size(path), key="")
    return load_planned(path, plan)


def collect_samples(config: DataConfig, multiple: int,
                    digest_of=content_digest) -> tuple[list[Sample], dict[str, Counter]]:
    """Every usable image of every entry with its plan; and, per entry id, why images were skipped (counts).

    `digest_of(path)` gives an image's content hash (`DigestMemo` skips files hashed before). An entry whose images
    are all skipped is an error naming it and the reasons."""
    samples, skipped = [], {}
    for e, entry in enumerate(config.images):
        geometry, reasons, kept = Geometry(entry, multiple), Counter(), 0
        for path, caps in find_captioned_images(entry):
            digest = digest_of(path)
            plan = geometry.plan(*image_size(path), key=f"{entry.id}|{digest}")
            if isinstance(plan, str):
                reasons[plan] += 1
                continue
            samples.append(Sample(path, caps[0], caps, e, plan, digest))
            kept += 1
        skipped[entry.id] = reasons
        if not kept:
            detail = ", ".join(f"{n} {why}" for why, n in reasons.items())
            raise DataError(f"{entry.where}: every image in {entry.image_dir} is skipped ({detail})")
    return samples, skipped


class DigestMemo:
    """Content hashes remembered across runs in a JSON file: a file whose size and mtime are unchanged is not read
    again (hashing reads every byte of every image: at a million images, a restart would re-read the data set)."""

    def __init__(self, path: str):
        self.path, self.known, self.changed = path, {}, False
        if os.path.exists(path):
            with open(path) as fh:
                self.known = json.load(fh)

    def __call__(self, image_path: str) -> str:
        key, st = os.path.abspath(image_path), os.stat(image_path)
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.known.get(key)
        if hit is not None and hit[:2] == stamp:
            return hit[2]
        digest = content_digest(image_path)
        self.known[key], self.changed = [*stamp, digest], True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(self.known, fh)
        os.replace(tmp, self.path)


def build_layout(samples: list[Sample], entries: list[ImageEntry]) -> Layout:
    """The order's view of the samples: one stream per (entry, bucket), with each entry's repeats."""
    streams, groups = [], []
    for e, entry in enumerate(entries):
        by_size: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            if s.entry == e:
                by_size.setdefault(s.plan.target, []).append(i)
        ids = []
        for (w, h), items in sorted(by_size.items()):
            ids.append(len(streams))
            streams.append(Stream(f"{entry.id}|{w}x{h}", items * (entry.repeats + 1), entry.shuffle))
        if ids:
            groups.append((entry.id, entry.probability, ids))
    return Layout(streams, groups, [len(s.captions) for s in samples])
