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

import numpy as np
import torch

from fewstep.data.backends import DataConfig, ImageEntry, load_data_config
from fewstep.data.buckets import UNREADABLE, Geometry, Plan, content_digest, decoded_size, image_size, load_planned
from fewstep.data.captions import IMAGE_EXTENSIONS, find_captioned_images
from fewstep.data.errors import DataError, missing_file
from fewstep.data.order import DataOrder, Layout, Stream
from fewstep.jsonfile import save_json

__all__ = ["DataError", "DataOrder", "Sample", "Backend", "load_backends", "find_samples", "load_image",
           "collect_samples", "list_images", "plan_samples", "probe_image",
           "ProbeMemo", "build_layout", "IMAGE_EXTENSIONS"]

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


def load_backends(path: str, config_defaults: Optional[dict] = None) -> list[ImageEntry]:
    """The enabled image entries of a multidatabackend.json (see `fewstep.data.backends.load_data_config`)."""
    return load_data_config(path, config_defaults).images


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


Probe = tuple  # (content digest, (width, height)): what the scan reads of an image file


def probe_image(path: str) -> Probe:
    """The two things read from an image at start-up, from one read of the file: its content hash (every byte) and
    its size (a full decode, so a file that does not decode is skipped here, not found at the cache fill;
    `UNREADABLE`)."""
    with open(path, "rb") as fh:
        data = fh.read()
    return content_digest(data), decoded_size(path, data)


def list_images(config: DataConfig) -> list[tuple[int, str, list[str]]]:
    """(entry index, image path, captions) of every captioned image of every enabled entry, in a fixed order."""
    return [(e, path, caps) for e, entry in enumerate(config.images) for path, caps in find_captioned_images(entry)]


def plan_samples(config: DataConfig, multiple: int, listed: list[tuple[int, str, list[str]]],
                 probes: list[Probe]) -> tuple[list[Sample], dict[str, Counter]]:
    """Give every listed image (with its probe) its bucket and crop; per entry id, why images were skipped. An entry
    whose images are all skipped is an error naming it and the reasons."""
    geometries = [Geometry(entry, multiple) for entry in config.images]
    reasons = {entry.id: Counter() for entry in config.images}
    samples = []
    for (e, path, caps), (digest, size) in zip(listed, probes, strict=True):
        entry = config.images[e]
        if tuple(size) == UNREADABLE:
            reasons[entry.id]["unreadable"] += 1
            continue
        plan = geometries[e].plan(*size, key=f"{entry.id}|{digest}")
        if isinstance(plan, str):
            reasons[entry.id][plan] += 1
            continue
        samples.append(Sample(path, caps[0], caps, e, plan, digest))
    kept = Counter(s.entry for s in samples)
    for e, entry in enumerate(config.images):
        if not kept[e]:
            detail = ", ".join(f"{n} {why}" for why, n in reasons[entry.id].items())
            raise DataError(f"{entry.where}: every image in {entry.image_dir} is skipped ({detail})")
    return samples, reasons


def collect_samples(config: DataConfig, multiple: int,
                    probe=probe_image) -> tuple[list[Sample], dict[str, Counter]]:
    """Every usable image of every entry with its plan; and, per entry id, why images were skipped (counts).

    `probe(path)` gives an image's (digest, size) (`ProbeMemo` skips files read before); an image listed by several
    entries (one folder at several resolutions) is probed once. One process does all of it; the trainer spreads the
    probes over ranks (`fewstep.data.prepare.scan_images`)."""
    listed = list_images(config)
    probes = {}
    for path in dict.fromkeys(path for _, path, _ in listed):
        try:
            probes[path] = probe(path)
        except FileNotFoundError:
            raise missing_file("image", path) from None
    return plan_samples(config, multiple, listed, [probes[path] for _, path, _ in listed])


class ProbeMemo:
    """Probes remembered across runs in a JSON file: a file whose stat stamp is unchanged is not read again (hashing
    reads every byte of every image: at a million images, a restart would re-read the data set).

    Entries are `path: [size, mtime_ns, ctime_ns, inode, digest, width, height]` (0 x 0: the file did not decode, and
    is probed again at the next start). Size and mtime alone missed an image replaced by another of the same size
    with its time kept (`cp -p`, `rsync -t`): the replacement has a new ctime (no tool sets it) or inode. Entries of
    other lengths (memos from before 2026-12-06) are probed again. A memo that is not valid JSON (a write cut short)
    is ignored with a line saying so, and rewritten. `record` is what a probe on any rank returns, so ranks can probe
    their share and one rank merges the records (`update`) and saves."""

    def __init__(self, path: str):
        self.path, self.known, self.changed = path, {}, False
        if os.path.exists(path):
            try:
                with open(path) as fh:
                    known = json.load(fh)
                problem = None if isinstance(known, dict) else "not a JSON object"
            except ValueError as e:  # not JSON (JSONDecodeError) or not text (UnicodeDecodeError)
                problem = e
            if problem is None:
                self.known = known
            else:  # only a cache: the images are read again
                print(f"fewstep: ignoring {path} ({problem}): it only remembers image hashes; the images are read "
                      "again and it is rewritten", flush=True)
                self.changed = True

    @staticmethod
    def _stamp(image_path: str) -> tuple[str, list[int]]:
        st = os.stat(image_path)
        return os.path.abspath(image_path), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def lookup(self, image_path: str) -> Probe | None:
        """The remembered probe if the file is unchanged (a stat, no read), else None."""
        try:
            key, stamp = self._stamp(image_path)
        except FileNotFoundError:  # listed, yet not there: a broken symbolic link
            raise missing_file("image", image_path) from None
        hit = self.known.get(key)
        if not isinstance(hit, list) or len(hit) != 7 or hit[:4] != stamp:
            return None
        if tuple(hit[5:7]) == UNREADABLE:  # probed again at each start: the failure may have been the filesystem's
            return None
        return self.probe_of(hit)

    @staticmethod
    def probe_of(entry: list) -> Probe:
        """The probe a memo entry (or a `record`) holds."""
        return entry[4], (entry[5], entry[6])

    @classmethod
    def record(cls, image_path: str) -> tuple[str, list]:
        """Probe the file: (memo key, memo entry)."""
        key, stamp = cls._stamp(image_path)
        digest, (w, h) = probe_image(image_path)
        return key, [*stamp, digest, w, h]

    def restamped(self, records: dict[str, list]) -> dict[str, list]:
        """`records` probed on other ranks, with this process's stat stamps: on another node's copy of the data (the
        same path on node-local disks) ctime and inode differ, and the next start would read those images again."""
        return {key: [*self._stamp(key)[1], *entry[4:]] for key, entry in records.items()}

    def update(self, records: dict[str, list]) -> None:
        self.known.update(records)
        self.changed |= bool(records)

    def __call__(self, image_path: str) -> Probe:
        hit = self.lookup(image_path)
        if hit is None:
            key, entry = self.record(image_path)
            self.update({key: entry})
            hit = self.probe_of(entry)
        return hit

    def save(self) -> None:
        if not self.changed:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        save_json(self.path, self.known)


def build_layout(samples, entries: list[ImageEntry]) -> Layout:
    """The order's view of the samples (a `fewstep.data.table.SampleTable`): one stream per (entry, bucket), each
    listing its sample indices in order once, with the entry's `repeats`."""
    streams, groups = [], []
    for e, entry in enumerate(entries):
        mine = np.flatnonzero(samples.entries == e)
        targets = samples.targets[mine]
        ids = []
        for w, h in np.unique(targets, axis=0):  # sorted by (w, h)
            ids.append(len(streams))
            items = mine[(targets[:, 0] == w) & (targets[:, 1] == h)]
            streams.append(Stream(f"{entry.id}|{w}x{h}", items, entry.shuffle, entry.repeats))
        if ids:
            groups.append((entry.id, entry.probability, ids))
    return Layout(streams, groups, samples.variants())
