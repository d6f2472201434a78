"""The benchmark's data: scikit-learn's 8x8 handwritten digits as a fewstep (SimpleTuner-style) image/caption dataset.

1,797 grey 8x8 images (values 0..16, ink bright) in 10 classes. A fixed stratified split (seed 0) keeps 20% held out
for evaluation. Images are upsampled 2x with nearest neighbours to 16x16 and written as PNG with one caption file
each, "a drawing of <digit word>": every digit word ("zero" .. "nine") is its own token in the tiny tokenizers'
vocabulary (checked by `check_captions`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RESOLUTION = 16  # pixels; the pixel VAE halves it, so the latents are the original 8x8 digits


def caption(label: int) -> str:
    """The caption for a digit class."""
    return f"a drawing of {WORDS[label]}"


@dataclass
class Split:
    """Images in [-1, 1], shape [N, 16, 16] (float32), and integer labels [N]."""
    images: np.ndarray
    labels: np.ndarray


def load_split(seed: int = 0, held_out: float = 0.2, limit: int | None = None) -> tuple[Split, Split]:
    """The fixed (train, held-out) split of `load_digits`, stratified by class; `limit` caps each part (smoke runs)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # [0, 16] -> [-1, 1]
    x = x.repeat(2, axis=1).repeat(2, axis=2)  # nearest-neighbour 2x upsampling to 16x16
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=held_out, random_state=seed, stratify=y)
    if limit is not None:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    return Split(xtr, ytr), Split(xte, yte)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 grey (the 17 digit levels map to exact bytes: 255 * v / 16, rounded)."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_dataset(split: Split, image_dir: str, backend_path: str, indices=None) -> str:
    """Write PNG + caption pairs (all of `split`, or `indices`) and a multidatabackend.json; returns its path."""
    os.makedirs(image_dir, exist_ok=True)
    idx = range(len(split.labels)) if indices is None else indices
    pixels = to_uint8(split.images)
    for i in idx:
        stem = os.path.join(image_dir, f"{i:04d}")
        Image.fromarray(pixels[i], mode="L").convert("RGB").save(stem + ".png")
        with open(stem + ".txt", "w") as fh:
            fh.write(caption(int(split.labels[i])))
    with open(backend_path, "w") as fh:
        json.dump([{"backend": "simple", "resolution": RESOLUTION, "shuffle": True,
                    "image_dir": os.path.abspath(image_dir), "caption_extension": ".txt"}], fh, indent=1)
    return backend_path


def pixel_stats(split: Split) -> tuple[float, float]:
    """Mean and std of the training pixels in [-1, 1]: the pixel VAE's shift_factor and 1 / scaling_factor."""
    return float(split.images.mean()), float(split.images.std())


def check_captions(tokenizer) -> None:
    """Every digit caption must tokenise without <unk> and the digit word must be a distinct token per class."""
    ids = [tokenizer(caption(k)).input_ids for k in range(10)]
    unk = tokenizer.unk_token_id
    for k, seq in enumerate(ids):
        if unk in seq:
            raise ValueError(f"caption {caption(k)!r} has an unknown word for the tiny vocabulary: ids {seq}")
    if len({tuple(s) for s in ids}) != 10:
        raise ValueError(f"digit captions do not map to 10 distinct token sequences: {ids}")
