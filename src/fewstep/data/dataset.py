"""Image/caption datasets in SimpleTuner's multidatabackend.json format, and a resumable data order.

A backend entry looks like `{"backend": "simple", "resolution": 1024, "shuffle": true, "image_dir": "data",
"caption_extension": ".txt"}`. Images and captions are paired by file stem; one pair is a valid dataset.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fewstep.errors import UserError
from fewstep.jsonfile import load_json

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BACKEND_KEYS = {"id", "backend", "type", "resolution", "shuffle", "image_dir", "instance_data_dir",
                "caption_extension", "repeats", "disabled"}


class DataError(UserError, ValueError):
    """A problem with the training data, naming the file."""


@dataclass
class Sample:
    image_path: str
    caption: str


@dataclass
class Backend:
    image_dir: str
    resolution: int
    shuffle: bool
    caption_extension: str
    repeats: int


def load_backends(path: str, resolution_override: Optional[int] = None) -> list[Backend]:
    """Parse multidatabackend.json; relative dirs resolve against the working directory, then the file's folder."""
    entries = load_json(path, DataError, "data_backend_config")
    if isinstance(entries, dict):
        entries = [entries]
    backends = []
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        unknown = set(entry) - BACKEND_KEYS
        if unknown:
            key = sorted(unknown)[0]
            hint = difflib.get_close_matches(key, BACKEND_KEYS, n=1)
            raise DataError(f"{where}: unknown key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))
        if entry.get("disabled"):
            continue
        kind = entry.get("backend", entry.get("type", "simple"))
        if kind not in ("simple", "local"):
            raise DataError(f"{where}: backend '{kind}' is not supported (use 'simple' or 'local')")
        image_dir = entry.get("image_dir", entry.get("instance_data_dir"))
        if image_dir is None:
            raise DataError(f"{where}: needs 'image_dir'")
        if not os.path.isabs(image_dir) and not os.path.isdir(image_dir):
            alt = os.path.join(os.path.dirname(os.path.abspath(path)), image_dir)
            image_dir = alt if os.path.isdir(alt) else image_dir
        if not os.path.isdir(image_dir):
            raise DataError(f"{where}: image_dir '{image_dir}' does not exist")
        resolution = resolution_override or entry.get("resolution")
        if not isinstance(resolution, int) or resolution < 8:
            raise DataError(f"{where}: 'resolution' must be an integer >= 8 pixels, got {resolution!r}")
        ext = entry.get("caption_extension", ".txt")
        backends.append(Backend(image_dir, resolution, bool(entry.get("shuffle", True)),
                                ext if ext.startswith(".") else "." + ext, int(entry.get("repeats", 1))))
    if not backends:
        raise DataError(f"{path}: no enabled data backends")
    return backends


def find_samples(backend: Backend) -> list[Sample]:
    """Pair images and captions by stem; any orphan is an error naming the file."""
    files = sorted(os.listdir(backend.image_dir))
    images = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)}
    captions = {os.path.splitext(f)[0]: f for f in files if f.endswith(backend.caption_extension)}
    for stem, cap in captions.items():
        if stem not in images:
            raise DataError(f"caption without an image: {os.path.join(backend.image_dir, cap)} "
                            f"(expected {stem}{{{','.join(IMAGE_EXTENSIONS)}}})")
    samples = []
    for stem, img in images.items():
        if stem not in captions:
            raise DataError(f"image without a caption: {os.path.join(backend.image_dir, img)} "
                            f"(expected {stem}{backend.caption_extension})")
        with open(os.path.join(backend.image_dir, captions[stem]), encoding="utf-8") as fh:
            caption = fh.read().strip()
        samples.append(Sample(os.path.join(backend.image_dir, img), caption))
    if not samples:
        raise DataError(f"no image/caption pairs in {backend.image_dir}")
    return samples * backend.repeats


def load_image(path: str, resolution: int, multiple: int) -> torch.Tensor:
    """Read an image, resize its short side to `resolution`, centre-crop a square; returns [3, R, R] in [-1, 1]."""
    if resolution % multiple:
        raise DataError(f"resolution {resolution} must be a multiple of {multiple} for this model "
                        f"(VAE factor x patch size); try {resolution - resolution % multiple or multiple}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                           Image.Resampling.BICUBIC)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class DataOrder:
    """A deterministic, resumable order over a dataset, sharded over ranks by position in the global batch.

    Global sample position p maps to epoch p // n and index perm_epoch[p % n]; a micro-step of rank r takes positions
    consumed + r*B + i. The only state is `consumed`, so resume is exact.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.consumed = seed, shuffle, 0
        self._perm_epoch, self._perm = -1, None

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if not self.shuffle:
            return p % self.n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[p % self.n]

    def next_indices(self) -> list[int]:
        start = self.consumed + self.rank * self.batch_size
        idx = [self._index(start + i) for i in range(self.batch_size)]
        self.consumed += self.batch_size * self.world_size
        return idx

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
