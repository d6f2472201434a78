"""The scanned samples as columns in files that every rank memory-maps: the data index.

A list of `Sample` objects, with the per-sample paths and prompt maps built from it, cost 1.4 KiB of private memory
per image in every rank (bench/RESULTS.md, "Data index per rank"), and sending it to the other ranks pickled it
through the collective's device: at 10 million images, 13 GiB per rank and 100 GiB per 8-GPU node. The table keeps the same facts as flat
arrays in one folder (`write_table` on one rank, `SampleTable(folder)` on all): the kernel's page cache holds them
once per node, shared by its ranks, and a rank's private memory no longer grows with the data set.

Columns (numpy `.npy`, opened with `mmap_mode="r"`):
- `entry` int32 [n]: index of the sample's image entry;
- `plan` int32 [n, 8]: target (w, h), resize (w, h), crop offset (x, y), source size (w, h) or (-1, -1);
- `digest` bytes [n]: the image's content hash;
- `path`, `prompt`: strings as one UTF-8 blob and int64 offsets (a file name that is not UTF-8 kept as Python's
  os functions give it: surrogate escapes); `prompt` holds each distinct caption once, in order of first use;
- `image` int32 [n]: the first sample with the same digest and the same target, resize and crop (`plan[:, :6]`):
  samples that share it encode to the same latents (an image in several entries), which are cached once;
- `caption_id` int32 [captions]: the prompt of each caption; `caption_start` int64 [n + 1]: sample i's captions are
  caption_start[i] .. caption_start[i + 1] - 1 (the first one is its `caption`). A cache fill asks which prompts an
  entry has (`np.unique` of its ids) and decodes only its own share of them.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from typing import Iterable

import numpy as np

from fewstep.checkpoint_files import fsync, fsync_tree
from fewstep.data.buckets import Plan
from fewstep.data.dataset import Sample

BLOCK = 1 << 16  # samples read at a time by whole-table questions (`prompt_ids_of`)
COLUMNS = ("entry", "plan", "digest", "image", "caption_start", "caption_id")  # and the string columns `path`, `prompt`


class StringColumn(Sequence):
    """Strings stored as one UTF-8 blob and n + 1 offsets (both memory-mapped)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @staticmethod
    def save(folder: str, name: str, strings: Iterable[str]) -> None:
        """Write `<name>.blob.npy` and `<name>.offsets.npy` into `folder`."""
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        np.save(os.path.join(folder, name + ".blob.npy"), np.frombuffer(b"".join(encoded), dtype=np.uint8))
        np.save(os.path.join(folder, name + ".offsets.npy"), offsets)

    @classmethod
    def open(cls, folder: str, name: str) -> "StringColumn":
        return cls(*(np.load(os.path.join(folder, f"{name}.{part}.npy"), mmap_mode="r")
                     for part in ("blob", "offsets")))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        i = int(i) + len(self) if i < 0 else int(i)
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")


def _plan_row(plan: Plan) -> list[int]:
    return [*plan.target, *plan.resize, *plan.offset, *(plan.source or (-1, -1))]


def _plan_of(row) -> Plan:
    w, h, rw, rh, x, y, sw, sh = (int(v) for v in row)
    return Plan((w, h), (rw, rh), (x, y), None if sw < 0 else (sw, sh))


def write_table(folder: str, samples: list[Sample]) -> None:
    """Write the samples' columns into `folder` (a new folder; written in a temporary one, flushed to disk and
    renamed, so a reader on any node sees all of it or nothing)."""
    tmp = f"{folder}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        caption_counts = [len(s.captions) for s in samples]
        starts = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(caption_counts, out=starts[1:])
        StringColumn.save(tmp, "path", (s.image_path for s in samples))
        prompt_ids: dict[str, int] = {}
        caption_ids = [prompt_ids.setdefault(c, len(prompt_ids)) for s in samples for c in s.captions]
        StringColumn.save(tmp, "prompt", prompt_ids)
        digests = [s.digest.encode() for s in samples]
        plans = np.array([_plan_row(s.plan) for s in samples], dtype=np.int32).reshape(len(samples), 8)
        digests = np.array(digests, dtype=f"S{max(map(len, digests), default=1) or 1}")
        columns = {
            "entry": np.array([s.entry for s in samples], dtype=np.int32), "plan": plans, "digest": digests,
            "image": _first_of_same_image(digests, plans), "caption_start": starts,
            "caption_id": np.array(caption_ids, dtype=np.int32),
        }
        for name, array in columns.items():
            np.save(os.path.join(tmp, name + ".npy"), array)
        fsync_tree(tmp)
        os.rename(tmp, folder)
        fsync(os.path.dirname(os.path.abspath(folder)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _first_of_same_image(digests: np.ndarray, plans: np.ndarray) -> np.ndarray:
    """The `image` column: for each sample, the first sample with its digest and plan[:6]. Computed once, by the
    rank that writes the table (about 250 B/sample of numpy transients), not by every rank at each start."""
    n = len(digests)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    rows = np.concatenate([digests.view(np.uint8).reshape(n, -1),
                           np.ascontiguousarray(plans[:, :6]).view(np.uint8).reshape(n, -1)], axis=1)
    keys = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()  # a row: one key
    _, first, group = np.unique(keys, return_index=True, return_inverse=True)
    return first[group.ravel()].astype(np.int32)


class SampleTable(Sequence):
    """The samples of a data index folder (`write_table`), read in place: `table[i]` builds sample i's `Sample`;
    the columns serve whole-table questions without building any (`entries`, `targets`)."""

    def __init__(self, folder: str):
        self.folder = folder
        col = {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r") for name in COLUMNS}
        self.entries, self.plans, self.digests, self.images = col["entry"], col["plan"], col["digest"], col["image"]
        self.paths, self.prompts = StringColumn.open(folder, "path"), StringColumn.open(folder, "prompt")
        self.caption_start, self.caption_ids = col["caption_start"], col["caption_id"]

    @classmethod
    def written(cls, folder: str, samples: list[Sample]) -> "SampleTable":
        """`samples` written into the new folder `folder`, and opened (one-process tools, tests)."""
        write_table(folder, samples)
        return cls(folder)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        i %= len(self)
        captions = self.captions(i)
        return Sample(self.paths[i], captions[0], captions, int(self.entries[i]), _plan_of(self.plans[i]),
                      self.digests[i].decode())

    def captions(self, i: int) -> list[str]:
        return [self.prompts[k] for k in self.caption_ids[self.caption_start[i]:self.caption_start[i + 1]]]

    def caption(self, i: int, variant: int = 0) -> str:
        first, end = int(self.caption_start[i]), int(self.caption_start[i + 1])
        if not 0 <= variant < end - first:
            raise IndexError(f"sample {i} has {end - first} caption(s), not a variant {variant}")
        return self.prompts[self.caption_ids[first + variant]]

    def prompt_ids_of(self, entries: list[int]) -> np.ndarray:
        """The distinct prompts (ids, ascending: order of first use) of the captions of these entries' samples.
        Read in blocks of samples, so that its transients are bounded: about 12 B a sample where every caption is
        distinct (the ids of each block, then all of them sorted)."""
        found = [np.zeros(0, dtype=np.int32)]
        for start in range(0, len(self), BLOCK):
            end = min(start + BLOCK, len(self))
            here = np.isin(self.entries[start:end], entries)
            if here.any():
                slots = np.repeat(here, np.diff(self.caption_start[start:end + 1]))
                first = int(self.caption_start[start])
                found.append(np.unique(self.caption_ids[first:first + len(slots)][slots]))
        return np.unique(np.concatenate(found))

    def empty_caption_counts(self) -> np.ndarray:
        """Per entry index, how many samples have no caption but the empty one (they train on the empty prompt: a
        caption file of blank lines, an empty instance_prompt). Read in blocks of samples, as `prompt_ids_of`."""
        counts = np.zeros(int(self.entries.max()) + 1 if len(self) else 0, dtype=np.int64)
        empty = np.flatnonzero(np.diff(self.prompts.offsets) == 0)  # the empty prompt's id (prompts are distinct)
        if not len(empty):
            return counts
        for start in range(0, len(self), BLOCK):
            end = min(start + BLOCK, len(self))
            bounds = np.asarray(self.caption_start[start:end + 1]) - int(self.caption_start[start])
            ids = self.caption_ids[int(self.caption_start[start]):int(self.caption_start[end])]
            running = np.concatenate([[0], np.cumsum(ids == empty[0])])  # empty captions before each slot
            hits, n = running[bounds[1:]] - running[bounds[:-1]], np.diff(bounds)
            counts += np.bincount(self.entries[start:end][(n > 0) & (hits == n)], minlength=len(counts))
        return counts

    def variants(self) -> np.ndarray:
        """How many captions each sample has."""
        return np.diff(self.caption_start)

    @property
    def targets(self) -> np.ndarray:
        """[n, 2]: each sample's bucket (w, h)."""
        return self.plans[:, :2]
