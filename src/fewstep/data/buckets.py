"""Aspect buckets: the size each image trains at, and how it is resized and cropped to get there.

Sizes follow SimpleTuner's DATALOADER.md, with sides rounded to the model's multiple (VAE factor x patch size):

- `resolution_type: pixel`: the short side is `resolution` (a square crop is `resolution` x `resolution`).
- `area`: `resolution` megapixels (1.0 -> 1024x1024, as SimpleTuner maps 0.25/0.5/1/2/4 MP); `pixel_area`: the
  area of a `resolution` x `resolution` square. A bucket of aspect a is (edge*sqrt(a), edge/sqrt(a)), rounded.
- `crop: false` or `crop_aspect: preserve`: each image keeps its aspect ratio (rounded to 2 decimals, as
  SimpleTuner's buckets); `square`: one square; `closest` / `random`: a size from `crop_aspect_buckets`.

An image is resized (aspect kept) just enough to cover its bucket, then cropped (`crop_style`), as SimpleTuner's
loader does (`TrainingSample._downsample_before_crop`, since its 2025-11 change; its DATALOADER.md still describes
a square crop cut from the unresized image, a tile of a large one). With `crop: true`, an image above
`maximum_image_size` is first resized to `target_downsample_size`, then to cover. `minimum_image_size`, the
aspect-ratio limits and fewstep's own limit on degenerate shapes (`MAX_ASPECT`) skip images. Random choices (crop
position, `crop_aspect: random`) are drawn once per image from its content hash, so every rank and every run agrees
and the cached latents stay valid.
"""
from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fewstep.data.backends import ImageEntry, config_given
from fewstep.data.errors import DataError

# Images longer than this many times their width (or wider than this many times their height) are skipped whatever
# the entry's settings: a square crop of a 2 x 500 divider first resizes it to 1024 x 256000 (0.8 GB), `preserve` gives
# it a bucket no VAE encodes, and below 1:200 its rounded aspect ratio is 0. minimum_/maximum_aspect_ratio set
# narrower limits.
MAX_ASPECT = 20
# SimpleTuner's area mapping: a resolution within 0.05 MP of a key trains at the key's square area
AREA_MAP = {0.25: 512 ** 2, 0.5: 768 ** 2, 1.0: 1024 ** 2, 2.0: 1536 ** 2, 4.0: 2048 ** 2}


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest multiple, at least one multiple (SimpleTuner's `_round_to_nearest_multiple`)."""
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass(frozen=True)
class Plan:
    """How one image becomes training pixels: resize to `resize`, crop `target` at `offset` (all (x, y) / (w, h)).

    `source` is the image's own size (after its EXIF orientation), kept for SDXL's micro-conditioning (original size
    and crop corner, `FlowModelAdapter.micro_cond`); the pixels follow from resize and offset alone, so it is not part
    of the cache key (`tag`) nor of equality."""
    target: tuple[int, int]
    resize: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    source: Optional[tuple[int, int]] = field(default=None, compare=False)

    def tag(self) -> str:
        """Identifies the pixels this plan produces (part of the latent cache key)."""
        (w, h), (rw, rh), (x, y) = self.target, self.resize, self.offset
        return f"{w}x{h}|r{rw}x{rh}|o{x},{y}"


def _megapixels(value: float, resolution_type: str) -> float:
    """A size in an area entry, as megapixels: a pixel_area value is the edge of a square, whatever its size, as
    SimpleTuner's factory squares it (`_handle_resolution_conversion`; fewstep once kept values up to 10 as megapixels,
    so `minimum_image_size: 1` skipped every image under 1 MP where SimpleTuner skips none)."""
    return value * value / 1e6 if resolution_type == "pixel_area" else value


def _cover(w: int, h: int, tw: int, th: int) -> tuple[int, int]:
    """The smallest aspect-preserving size of a w x h image that covers tw x th."""
    s = max(tw / w, th / h)
    return max(tw, round(w * s)), max(th, round(h * s))


class Geometry:
    """One image entry's size rules for a model whose image sides must be multiples of `multiple`."""

    def __init__(self, entry: ImageEntry, multiple: int):
        self.entry, self.m = entry, multiple
        self.area_kind = entry.resolution_type != "pixel"
        limits = (entry.minimum_image_size, entry.maximum_image_size, entry.target_downsample_size)
        if self.area_kind:  # in megapixels from here on
            limits = tuple(None if v is None else _megapixels(v, entry.resolution_type) for v in limits)
        self.min_size, self.max_size, self.downsample = limits
        if self.area_kind:
            mp = entry.resolution ** 2 / 1e6 if entry.resolution_type == "pixel_area" else entry.resolution
            self.area = next((a for k, a in AREA_MAP.items() if abs(mp - k) < 0.05), mp * 1e6)
            self.edge = round_to_multiple(int(math.sqrt(self.area)), multiple)
            if self.min_size is not None and self.min_size > 5:
                given = config_given(entry.inherited, ("minimum_image_size", "resolution_type"))
                raise DataError(f"{entry.where}: minimum_image_size {entry.minimum_image_size} is in megapixels "
                                f"with this resolution_type and is most likely too large (use a value below 5){given}")
        else:
            self.edge = int(entry.resolution)
            if entry.crop and entry.crop_aspect == "square" and self.edge % multiple:
                low = self.edge - self.edge % multiple or multiple
                raise DataError(f"{entry.where}: resolution {self.edge} must be a multiple of {multiple} for this "
                                f"model (VAE factor x patch size); try {low}")

    # ---------------------------------------------------------------- sizes
    def bucket(self, aspect: float) -> tuple[int, int]:
        """The training size (width, height) of aspect ratio `aspect` (width / height)."""
        if aspect == 1.0:
            side = round_to_multiple(self.edge, self.m)
            return side, side
        if self.area_kind:
            return (round_to_multiple(self.edge * math.sqrt(aspect), self.m),
                    round_to_multiple(self.edge / math.sqrt(aspect), self.m))
        r = self.edge  # pixel: the short side is `resolution`
        w, h = (r, int(r / aspect)) if aspect < 1 else (int(r * aspect), r)
        return round_to_multiple(w, self.m), round_to_multiple(h, self.m)

    @property
    def square(self) -> tuple[int, int]:
        return self.bucket(1.0)

    def skip_reason(self, w: int, h: int) -> Optional[str]:
        """Why an image of this size is left out (SimpleTuner's size and aspect filters, and fewstep's limit on
        degenerate shapes), or None."""
        if max(w, h) > MAX_ASPECT * min(w, h):  # a divider or banner: its cover resize or bucket is unbounded
            return f"aspect ratio beyond {MAX_ASPECT}:1"
        e, aspect = self.entry, round(w / h, 2)
        if e.minimum_aspect_ratio is not None and aspect < e.minimum_aspect_ratio:
            return "aspect ratio below minimum_aspect_ratio"
        if e.maximum_aspect_ratio is not None and aspect > e.maximum_aspect_ratio:
            return "aspect ratio above maximum_aspect_ratio"
        if not self.min_size:
            return None
        if not self.area_kind:
            return "smaller than minimum_image_size" if min(w, h) < self.min_size else None
        min_area = round(self.min_size * 1e6, 6)  # to pixels, less the float noise (63 px: 3969.0000000000005)
        if e.crop and e.crop_aspect == "square" and min(w, h) < math.floor(math.sqrt(min_area)):
            return "smaller than minimum_image_size"
        return "smaller than minimum_image_size" if w * h < min_area else None

    def _aspect(self, w: int, h: int, key: str) -> Optional[float]:
        e = self.entry
        if e.crop_aspect == "square":
            return 1.0
        if e.crop_aspect == "preserve":
            return round(w / h, 2)
        choices = [(b["aspect"], b["weight"]) if isinstance(b, dict) else (b, 1.0) for b in e.crop_aspect_buckets]
        if e.max_upscale_threshold is not None:  # buckets that would need more upscaling are not offered
            limit = 1 + e.max_upscale_threshold
            choices = [(a, p) for a, p in choices if all(t <= s * limit for t, s in zip(self.bucket(a), (w, h)))]
        if not choices:
            return None
        if e.crop_aspect == "closest":
            return float(min(choices, key=lambda c: abs(c[0] - w / h))[0])
        rng = random.Random(f"aspect|{key}")
        return float(rng.choices([a for a, _ in choices], weights=[p for _, p in choices])[0])

    def _too_large(self, w: int, h: int) -> bool:
        if self.area_kind:
            return w * h > round(self.max_size * 1e6, 6)  # (89 px: 7920.999999999999, an 89 x 89 image over it)
        return w > self.max_size or h > self.max_size

    def _downsampled(self, w: int, h: int) -> tuple[int, int]:
        """The size at target_downsample_size (aspect kept): short side (pixel) or area (area types)."""
        s = math.sqrt(self.downsample * 1e6 / (w * h)) if self.area_kind else self.downsample / min(w, h)
        return max(1, round(w * s)), max(1, round(h * s))

    def plan(self, w: int, h: int, key: str) -> Plan | str:
        """The plan for a w x h image (key: a stable id of its content), or the reason it is skipped."""
        reason = self.skip_reason(w, h)
        if reason:
            return reason
        aspect = self._aspect(w, h, key)
        if aspect is None:
            return "needs more upscaling than max_upscale_threshold allows for every crop_aspect_bucket"
        tw, th = target = self.bucket(aspect)
        e = self.entry
        covers = lambda size: size[0] >= tw and size[1] >= th  # noqa: E731
        if e.crop and self.max_size and self.downsample and self._too_large(w, h):
            size = self._downsampled(w, h)
            size = size if covers(size) else _cover(*size, tw, th)
        else:
            size = _cover(w, h, tw, th)
        free = (size[0] - tw, size[1] - th)
        if e.crop_style == "corner":
            offset = (0, 0)
        elif e.crop_style == "random":
            rng = random.Random(f"crop|{key}")
            offset = (rng.randint(0, free[0]), rng.randint(0, free[1]))
        else:
            offset = (free[0] // 2, free[1] // 2)
        return Plan(target, size, offset, (w, h))


def _used_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: rotated by 90 or 270 degrees
        w, h = h, w
    return w, h


def image_size(path: str) -> tuple[int, int]:
    """(width, height) as the image will be used (after its EXIF orientation), read from the file's header."""
    try:
        with Image.open(path) as im:
            return _used_size(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None


UNREADABLE = (0, 0)  # the size a probe records for a file that does not decode


def decoded_size(path: str, data: bytes) -> tuple[int, int]:
    """`image_size` from a full decode of the file's bytes `data`: a truncated or corrupt file passes a header read
    and would stop the whole job at the cache fill. UNREADABLE (with a line naming the file) if it does not decode,
    or is larger than Pillow's decompression-bomb limit."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _used_size(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = "not an image format Pillow reads" if isinstance(e, UnidentifiedImageError) else e  # (its message
        print(f"fewstep: skipping unreadable image {path}: {why}", flush=True)  # names an in-memory BytesIO)
        return UNREADABLE


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


# The version of the pixels `load_planned` makes of a file, part of every latent's cache key: raised when they change,
# so that no latent encoded from the old pixels is reused. 2 (2026-12-06): 16-bit greyscale and transparent images.
DECODE_VERSION = 2
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how older Pillow opened a 16-bit greyscale PNG


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as SimpleTuner's OpenCV decode gives it. 16-bit greyscale is scaled to 8 bits (its top byte;
    Pillow's convert clips the values instead, so all but the darkest grey became white), and transparent pixels
    are composited onto white (convert drops the alpha channel: they became black, or whatever colour they hold)."""
    if im.mode in _SIXTEEN_BIT:
        grey = np.asarray(im).astype(np.int64)
        grey8 = Image.fromarray((grey >> 8).clip(0, 255).astype(np.uint8), "L")
        if "transparency" not in im.info:  # a PNG's tRNS names one 16-bit grey value as transparent
            return grey8.convert("RGB")
        alpha = Image.fromarray(np.where(grey == im.info["transparency"], 0, 255).astype(np.uint8), "L")
        im = Image.merge("LA", (grey8, alpha))
    if im.has_transparency_data:  # an alpha channel, or a palette / colour key with transparent entries (tRNS)
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def load_planned(path: str, plan: Plan) -> torch.Tensor:
    """The image's training pixels per `plan`: [3, H, W] in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im = to_rgb(ImageOps.exif_transpose(im))
            if im.size != plan.resize:
                im = im.resize(plan.resize, Image.Resampling.BICUBIC)
            x, y = plan.offset
            im = im.crop((x, y, x + plan.target[0], y + plan.target[1]))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
