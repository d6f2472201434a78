"""On-disk cache of VAE latents and text embeddings, keyed by content and model.

Everything a run needs from the VAE and text encoders (training latents, caption embeddings, the empty-prompt
embedding for CFG and caption dropout, validation prompt embeddings) is computed once by rank 0 and stored as
safetensors. Training then loads only the transformer.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from fewstep.data.dataset import Sample, load_image


def model_key(family: str, name_or_path: str) -> str:
    """Identify the encoders: family, path, and (for local dirs) their configs and weight-file sizes/mtimes."""
    h = hashlib.sha256(f"{family}|{name_or_path}".encode())
    if os.path.isdir(name_or_path):
        for sub in sorted(glob.glob(os.path.join(name_or_path, "*"))):
            name = os.path.basename(sub)
            if not (name.startswith("vae") or name.startswith("text_encoder") or name.startswith("tokenizer")):
                continue
            for f in sorted(glob.glob(os.path.join(sub, "*"))):
                st = os.stat(f)
                h.update(f"{name}/{os.path.basename(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _atomic_save(tensors: dict, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class EmbeddingCache:
    """Latents at `<dir>/<model>/latents/<hash>.safetensors`, text at `<dir>/<model>/text/<hash>.safetensors`."""

    def __init__(self, root: str, model: str):
        self.root = os.path.join(root, model)
        os.makedirs(os.path.join(self.root, "latents"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "text"), exist_ok=True)

    def latent_path(self, sample: Sample, resolution: int) -> str:
        with open(sample.image_path, "rb") as fh:
            key = _digest(fh.read(), resolution)
        return os.path.join(self.root, "latents", key + ".safetensors")

    def text_path(self, prompt: str) -> str:
        return os.path.join(self.root, "text", _digest(prompt) + ".safetensors")

    def missing(self, samples: list[Sample], resolution: int, prompts: list[str]) -> tuple[list, list]:
        lat = [s for s in samples if not os.path.exists(self.latent_path(s, resolution))]
        txt = sorted({p for p in prompts if not os.path.exists(self.text_path(p))})
        return lat, txt

    def fill(self, samples: list[Sample], prompts: list[str], resolution: int, multiple: int,
             encode_images: Callable, encode_prompts: Callable, batch_size: int = 8) -> None:
        """Compute and store whatever is missing (call on one rank, then barrier)."""
        lat, txt = self.missing(samples, resolution, prompts)
        for i in range(0, len(lat), batch_size):
            chunk = lat[i:i + batch_size]
            pixels = torch.stack([load_image(s.image_path, resolution, multiple) for s in chunk])
            with torch.no_grad():
                latents = encode_images(pixels).float()
            for s, z in zip(chunk, latents):
                _atomic_save({"latents": z}, self.latent_path(s, resolution))
        for i in range(0, len(txt), batch_size):
            chunk = txt[i:i + batch_size]
            with torch.no_grad():
                emb = encode_prompts(chunk)
            for j, p in enumerate(chunk):
                _atomic_save({k: v[j].float() for k, v in emb.items()}, self.text_path(p))

    def load_latents(self, sample: Sample, resolution: int) -> torch.Tensor:
        return load_file(self.latent_path(sample, resolution))["latents"]

    def load_text(self, prompt: str) -> dict:
        return load_file(self.text_path(prompt))


class CachedDataset:
    """The training set held in memory as cached tensors: latents plus caption embeddings per sample."""

    def __init__(self, cache: EmbeddingCache, samples: list[Sample], resolution: int,
                 extra_prompts: Optional[list[str]] = None):
        self.samples = samples
        self.latents = [cache.load_latents(s, resolution) for s in samples]
        prompts = {s.caption for s in samples} | {""} | set(extra_prompts or [])
        self.text = {p: cache.load_text(p) for p in prompts}

    def __len__(self) -> int:
        return len(self.samples)

    def item(self, i: int) -> tuple[torch.Tensor, dict]:
        return self.latents[i], self.text[self.samples[i].caption]

    @property
    def uncond(self) -> dict:
        return self.text[""]


def describe(dataset: CachedDataset) -> str:
    shape = tuple(dataset.latents[0].shape)
    return json.dumps({"samples": len(dataset), "latent_shape": shape,
                       "captions": sorted({s.caption for s in dataset.samples})[:3]})
