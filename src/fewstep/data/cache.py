"""On-disk cache of VAE latents and text embeddings, keyed by content and model.

Everything a run needs from the VAE and text encoders (training latents, caption embeddings, the empty-prompt
embedding for CFG and caption dropout, validation prompt embeddings) is computed once and stored as safetensors.
Training then loads only the transformer.

Where: the run's `cache_dir` by default; an image entry's `cache_dir_vae` (or the `cache_dir` of the image_embeds
entry it names) for its latents; a text_embeds entry's `cache_dir` for the captions of the entries it serves (the
default one also holds the empty and validation prompts). Each directory gets a subfolder per model and storage
dtype (the training dtype: bf16 latents and embeddings take half of fp32's disk and I/O); a latent file is keyed by
the image's content, its plan (bucket, resize, crop) and the version of its decode (`buckets.DECODE_VERSION`), a
text file by the prompt. Files sit in 256 subfolders by the first two hex digits of their key: a million images make
~4k entries per folder, not a million in one (which parallel filesystems serve slowly). A cache written in the older
flat layout keeps it: read in place, not encoded again, nothing moved.

Reads are lazy: `CachedDataset` keeps file paths, and reads a sample's latents and caption embeddings (safetensors,
memory-mapped) when the data order draws it. Only the empty prompt's and the validation prompts' embeddings stay in
memory, so a data set much larger than host memory trains, and memory per rank does not grow with it.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fewstep.data.buckets import DECODE_VERSION, load_planned
from fewstep.data.dataset import Sample, build_layout
from fewstep.data.errors import DataError
from fewstep.data.table import SampleTable
from fewstep.models.source import folder_components, forces_zeros_for_empty_prompt
from fewstep.paths import removed_on_failure, temporary_beside


def model_key(family: str, name_or_path: str) -> str:
    """Identify the encoders by content, not by place or time: the family and, for a local folder, each VAE /
    text-encoder / tokenizer file's name, size and a hash of its first and last MiB (a safetensors file starts with
    its tensor index), of the folders its model_index.json names (SDXL's `vae_1_0/` is not loaded); otherwise the
    name. A copy of the model on each node's disk, made anew at every requeue, keeps
    its key (its paths and modification times would not, and each node would encode the data set again).
    `force_zeros_for_empty_prompt: false` in model_index.json (SDXL: "" is encoded, not zeros) counts too; the
    default adds nothing, so caches made before it counted keep their key."""
    h = hashlib.sha256(family.encode())
    if not os.path.isdir(name_or_path):
        h.update(f"|{name_or_path}".encode())
        return h.hexdigest()[:16]
    if not forces_zeros_for_empty_prompt(name_or_path):
        h.update(b"|force_zeros_for_empty_prompt=false")
    components = folder_components(name_or_path)  # a folder model_index.json does not name is not loaded
    for sub in sorted(glob.glob(os.path.join(name_or_path, "*"))):
        name = os.path.basename(sub)
        if not (name.startswith("vae") or name.startswith("text_encoder") or name.startswith("tokenizer")):
            continue
        if components is not None and name not in components:
            continue
        for f in sorted(glob.glob(os.path.join(sub, "*"))):
            if os.path.isfile(f):
                h.update(f"|{name}/{os.path.basename(f)}|{os.path.getsize(f)}|".encode())
                h.update(_head_and_tail(f))
    return h.hexdigest()[:16]


def _head_and_tail(path: str, n: int = 1 << 20) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(n)
        size = fh.seek(0, os.SEEK_END)
        if size <= 2 * n:
            fh.seek(len(head))
            return head + fh.read()
        fh.seek(size - n)
        return head + fh.read()


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def atomic_save(tensors: dict, path: str, keep_existing: bool = False) -> None:
    """safetensors written under a temporary name, then renamed: a reader sees the whole file or none, and a failed
    write (a full disk) leaves nothing behind. `keep_existing`: a file already at `path` stays (a cache entry that
    another run sharing the cache wrote meanwhile: its encoder batch may have rounded differently, and a run that
    read it must not find other bits there later)."""
    tmp = temporary_beside(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with removed_on_failure(tmp):
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
        if not (keep_existing and _published_unless_present(tmp, path)):
            os.replace(tmp, path)


def _published_unless_present(tmp: str, path: str) -> bool:
    """`tmp` hard-linked at `path` unless a file is there already (the first writer wins), and removed; False where
    the filesystem has no hard links (the caller renames: the last writer wins)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:
        return False
    os.remove(tmp)
    return True


def _has_flat_files(folder: str) -> bool:
    """Whether `folder` holds cache files directly (the layout before 2026-12-06), not in key subfolders. Stops at
    the first entry that answers, so a large folder is not listed."""
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.endswith(".safetensors"):
                return True
            if e.is_dir() and len(e.name) == 2:
                return False
    return False


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class EmbeddingCache:
    """Latents at `<dir>/<model>/<dtype>/latents/<hash[:2]>/<hash>.safetensors`, text at `.../text/...` alike (in
    a cache of the flat layout, `.../latents/<hash>.safetensors`)."""

    def __init__(self, root: str, model: str, text_batch_size: int = 8, dtype: torch.dtype = torch.float32):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"cache dtype must be one of {list(DTYPE_NAMES)}, got {dtype}")
        self.root = os.path.join(root, model, DTYPE_NAMES[dtype])
        self.text_batch_size, self.dtype = text_batch_size, dtype
        try:
            os.makedirs(os.path.join(self.root, "latents"), exist_ok=True)
            os.makedirs(os.path.join(self.root, "text"), exist_ok=True)
        except OSError as e:  # e.g. a path under /proc, or a read-only filesystem
            raise DataError(f"cache folder '{root}': cannot create {e.filename or self.root}: "
                            f"{e.strerror or e}") from None
        # a cache written in the flat layout keeps it (read in place, new entries beside the old): nothing is moved,
        # so a read-only cache, a run of an older version on it, and going back to that version all keep working
        self.flat = {kind: _has_flat_files(os.path.join(self.root, kind)) for kind in ("latents", "text")}

    def _path(self, kind: str, key: str) -> str:
        if self.flat[kind]:
            return os.path.join(self.root, kind, key + ".safetensors")
        return os.path.join(self.root, kind, key[:2], key + ".safetensors")

    def latent_path(self, sample: Sample) -> str:
        return self._path("latents", _digest(sample.digest, sample.plan.tag(), f"decode{DECODE_VERSION}"))

    def text_path(self, prompt: str) -> str:
        return self._path("text", _digest(prompt))

    def missing(self, samples: Iterable[Sample], prompts: Iterable[str]) -> tuple[list, list]:
        lat = [s for s in samples if not os.path.exists(self.latent_path(s))]
        txt = sorted({p for p in prompts if not os.path.exists(self.text_path(p))})
        return lat, txt

    def fill(self, samples: list[Sample], prompts: list[str], encode_images: Callable, encode_prompts: Callable,
             batch_size: int = 8, stop: Optional[Callable[[], bool]] = None) -> None:
        """Compute and store whatever is missing; images are encoded in batches of one size. `stop()` true between
        two batches ends the fill there (each file is written whole: a later fill adds the rest).

        encode_images(pixels [B,3,H,W]) -> latents [B,...]; encode_prompts(prompts) -> one dict of tensors per prompt,
        each trimmed to its own length (`FlowModelAdapter.split_cond`): an entry must not depend on the prompts it
        was encoded with (Qwen-Image pads a batch to its longest prompt)."""
        lat, txt = self.missing(samples, prompts)
        by_size: dict[tuple, list[Sample]] = {}
        for s in lat:
            by_size.setdefault(s.plan.target, []).append(s)
        for group in by_size.values():
            for i in range(0, len(group), batch_size):
                if stop is not None and stop():
                    return
                chunk = group[i:i + batch_size]
                pixels = torch.stack([load_planned(s.image_path, s.plan) for s in chunk])
                with torch.no_grad():
                    latents = encode_images(pixels)
                for s, z in zip(chunk, latents):
                    atomic_save({"latents": z.to(self.dtype)}, self.latent_path(s), keep_existing=True)
        for i in range(0, len(txt), self.text_batch_size):
            if stop is not None and stop():
                return
            chunk = txt[i:i + self.text_batch_size]
            with torch.no_grad():
                items = encode_prompts(chunk)
            for p, item in zip(chunk, items, strict=True):
                atomic_save({k: v.to(self.dtype) for k, v in item.items()}, self.text_path(p), keep_existing=True)


class CacheSet:
    """Which cache directory holds what (see the module doc): an entry's latents and its captions' embeddings each
    live in one directory; the empty and validation prompts in the default text directory.

    `work(root)` lists a directory's entries in one order on every rank, so that the ranks sharing the directory
    can split its filling (`share`)."""

    def __init__(self, samples: SampleTable, entries: list, extra_prompts: list[str], base_dir: str, model: str,
                 default_text_dir: Optional[str] = None, text_batch_sizes: Optional[dict] = None,
                 dtype: torch.dtype = torch.float32, text_batch_size: int = 8):
        sizes = text_batch_sizes or {}  # per text cache directory (its text_embeds entry's); else text_batch_size
        self.caches: dict[str, EmbeddingCache] = {}

        def cache(directory: Optional[str]) -> EmbeddingCache:
            size, directory = sizes.get(directory, text_batch_size), directory or base_dir
            if directory not in self.caches:
                self.caches[directory] = EmbeddingCache(directory, model, size, dtype)
            return self.caches[directory]

        self.samples, self.extra_prompts = samples, list(dict.fromkeys(extra_prompts))
        self.latent_cache = [cache(e.vae_cache_dir) for e in entries]  # per entry
        self.text_cache = [cache(e.text_cache_dir) for e in entries]
        self.extra_cache = cache(default_text_dir)

    def roots(self) -> list[str]:
        return sorted(c.root for c in self.caches.values())

    def _entries_at(self, per_entry: list[EmbeddingCache], root: str) -> list[int]:
        """The entries whose files of this kind are kept under `root`."""
        return [e for e, c in enumerate(per_entry) if c.root == root]

    def work(self, root: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """What is stored under `root`, in the same order on every rank, without decoding the table: the unique
        latents (sample indices, the first of each image and plan), the prompts of the captions (`SampleTable`
        prompt ids), and the run's extra prompts (empty, validation) if this is the default text directory."""
        table = self.samples
        prompts = table.prompt_ids_of(self._entries_at(self.text_cache, root))  # first: its transients are larger
        here = np.isin(table.entries, self._entries_at(self.latent_cache, root))  # bool [n]
        lat = np.flatnonzero(here)
        image = table.images[lat]
        # an image repeated in entries is encoded once: its first sample, if that is stored here (the usual case),
        # else the first of its samples that are (its first sample is in an entry of another folder)
        keep = image == lat
        stray = ~here[image]
        if stray.any():
            _, first = np.unique(image[stray], return_index=True)
            keep[np.flatnonzero(stray)[first]] = True
        lat = lat[keep]
        extra = self.extra_prompts if self.extra_cache.root == root else []
        return lat, prompts, extra

    def share(self, root: str, index: int, size: int) -> tuple[list[Sample], list[str]]:
        """What this rank (`index` of `size` ranks that see `root`) still has to compute for `root`: only its share
        of the work is decoded and looked up (a restart with a full cache holds no per-sample objects)."""
        lat, ids, extra = self.work(root)
        table = self.samples
        prompts = [table.prompts[ids[p]] if p < len(ids) else extra[p - len(ids)]
                   for p in range(index, len(ids) + len(extra), size)]
        return self.cache_at(root).missing((table[int(i)] for i in lat[index::size]), prompts)

    def cache_at(self, root: str) -> EmbeddingCache:
        return next(c for c in self.caches.values() if c.root == root)


def read_cached(path: str) -> dict:
    """A cache file's tensors; one that cannot be read (cut short by a crash before it reached the disk, or damaged
    since: fills never rewrite a file that exists) is a DataError naming it and the way on."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise DataError(f"cache file {path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ": delete it, and the next start encodes it again") from None


class PromptEmbeddings:
    """prompt -> its cached embeddings, read from disk on each access; the `resident` prompts (the empty one, the
    validation prompts) are read once and kept. A caption is found in its entry's text cache (`CachedDataset.item`
    knows which); looked up by text, the first cache that holds it answers."""

    def __init__(self, caches: list[EmbeddingCache], resident: list[str], resident_cache: EmbeddingCache):
        self.caches = list(dict.fromkeys([resident_cache, *caches]))
        self.resident = {p: read_cached(resident_cache.text_path(p)) for p in resident}

    def __getitem__(self, prompt: str) -> dict:
        hit = self.resident.get(prompt)
        if hit is not None:
            return hit
        for cache in self.caches:
            path = cache.text_path(prompt)
            if os.path.exists(path):
                return read_cached(path)
        raise KeyError(f"no cached embedding of prompt {prompt!r}")


class CachedDataset:
    """The training set as cached tensors on disk: each sample's latents and caption embeddings are read when drawn
    (module doc), and the `layout` the data order draws batches from (one bucket per batch). Per sample, it holds
    nothing in memory beyond the data order's indices: the samples are the memory-mapped `SampleTable`."""

    def __init__(self, caches: CacheSet, entries: list, multiple: int, extra_prompts: Optional[list[str]] = None,
                 validation_library: Optional[list[tuple[str, str]]] = None):
        self.samples, self.entries, self.multiple = caches.samples, entries, multiple
        self.validation_library = list(validation_library or [])  # (name, prompt): validation renders them too
        self.latent_cache, self.text_cache = caches.latent_cache, caches.text_cache
        resident = list(dict.fromkeys(["", *(extra_prompts or [])]))
        self.text = PromptEmbeddings(self.text_cache, resident, caches.extra_cache)
        self.layout = build_layout(self.samples, entries)

    def __len__(self) -> int:
        return len(self.samples)

    def latent_path(self, i: int) -> str:
        sample = self.samples[i]
        return self.latent_cache[sample.entry].latent_path(sample)

    def latents(self, i: int) -> torch.Tensor:
        return read_cached(self.latent_path(i))["latents"]

    def item(self, i: int, variant: int = 0) -> tuple[torch.Tensor, dict]:
        prompt = self.samples.caption(i, variant)
        hit = self.text.resident.get(prompt)
        if hit is None:
            hit = read_cached(self.text_cache[int(self.samples.entries[i])].text_path(prompt))
        return self.latents(i), hit

    @property
    def uncond(self) -> dict:
        return self.text[""]

    def validation_shape(self, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """The latent shape of a validation image of `size` (width, height) pixels, each side snapped down to the
        model's multiple; None: a square at the first entry's resolution."""
        from fewstep.data.buckets import Geometry

        first = self.samples[0]
        c, _, w = self.latents(0).shape
        factor = first.plan.target[0] // w  # the VAE's downsampling
        if size is None:
            size = Geometry(self.entries[first.entry], self.multiple).square
        width, height = (max(self.multiple, side // self.multiple * self.multiple) for side in size)
        return c, height // factor, width // factor
