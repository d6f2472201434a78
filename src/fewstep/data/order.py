"""A deterministic, resumable, rank-sharded order over bucketed data from one or more entries.

The data are split into streams, one per (entry, bucket), each an endless sequence of positions, cut into epochs
(step 3). One call of `next_items` is one micro-step of every rank together, a "slot":

1. the slot's entry is drawn (seeded by the slot number; one entry: always it) with weights `probability` times the
   entry's size (SimpleTuner's `data_backend_sampling` "auto-weighting", its default), or `probability` alone
   ("uniform");
2. the entry's next batch comes from one of its buckets, following rounds: round r gives bucket j
   floor((r+1) n_j / G) - floor(r n_j / G) batches (n_j: its images, times R + 1 with `repeats` R; G: the global
   batch), shuffled (seeded by the round number). A round is one pass over the entry's data, and every bucket gets
   its share, n_j / G batches per round, exactly in the long run: a bucket smaller than G appears in some rounds
   only (it once had a whole batch in every round, so one odd-sized image could make a 64th of the batches);
3. rank r takes positions c + r*B .. c + r*B + B - 1 of that stream (c: the stream's positions used so far), so
   every rank's micro-batch of a step has the same shape. Position p of a stream of n items is item perm_e[q % n],
   q = p % L, of epoch e = p // L (a seeded permutation per epoch, or file order without `shuffle`), where an epoch
   is L = ceil(n / G) * G positions if n >= G: whole global batches, the last one completed with the epoch's first
   items (as torch's DistributedSampler pads), so that a global batch never holds an item twice and the ranks'
   samples are disjoint. A stream smaller than G has epochs of L = n positions: its batches wrap into the next
   epochs. Positions advance by G, so a batch fits in its epoch; one that would not (only after resuming with
   another global batch: world size or batch size) starts the next epoch instead.

`repeats` R thus counts each image R + 1 times in the entry weights and the rounds (so it comes R + 1 times per
round), while a stream's items and permutations are held once, whatever R.

The state is counters only (slots, per-entry slots, per-stream positions, keyed by name), so resume is exact. One
entry with one bucket gives exactly the order of fewstep before buckets (its state's `consumed` too). Before
2026-12-06 an epoch was n positions whatever G (a batch across an epoch's end could give two ranks one image) and a
stream listed its items R + 1 times. A checkpoint of that version resumes (its counters keep their meaning: the
positions used), and exactly so within this version; a stream whose size is not a multiple of G, or with repeats,
then draws other samples than the older version would have after its first epoch.

Memory (every rank holds an order, of up to millions of images): numpy arrays, no Python ints per item; the order
keeps the two latest permutations of each stream (int32: 4 bytes an item) and the two latest round schedules of
each entry.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from fewstep.data.errors import DataError


@dataclass
class Stream:
    key: str              # "<entry id>|<W>x<H>": the state is keyed by it
    items: Sequence[int]  # dataset indices, each once
    shuffle: bool = True
    repeats: int = 0      # its entry's `repeats`: the stream weighs R + 1 times its items (module doc)

    def __post_init__(self):
        self.items = np.asarray(self.items, dtype=np.int64)  # no copy of an int64 array

    @property
    def size(self) -> int:
        """Its samples per round of its entry: each item R + 1 times."""
        return len(self.items) * (self.repeats + 1)


@dataclass
class Layout:
    """What the order needs to know about the data: its streams, which entry each belongs to, entry weights, and
    how many caption variants each dataset index has."""
    streams: list[Stream]
    entries: list[tuple[str, float, list[int]]]  # (entry id, probability, its stream indices)
    variants: Sequence[int] = field(default_factory=list)  # per dataset index; empty: one each

    def __post_init__(self):
        v = np.asarray(self.variants if self.variants is not None else (), dtype=np.int64)
        self.variants = v.astype(np.min_scalar_type(v.max()) if len(v) else np.uint8)  # mostly 1 byte an image

    @staticmethod
    def single(n: int, shuffle: bool = True) -> "Layout":
        """n items in one stream (a dataset without buckets)."""
        return Layout([Stream("all", np.arange(n), shuffle)], [("all", 1.0, [0])])


SAMPLING = ("auto-weighting", "uniform")  # how entries are weighted (SimpleTuner's data_backend_sampling)


def _hash_int(*parts) -> int:
    """A stable 63-bit integer of `parts` (identical on every rank, run and Python)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _latest(cache: dict, key, sub, make, keep: int = 2):
    """cache[key][sub], made if absent; each key keeps its `keep` latest subs (the oldest made goes first)."""
    recent = cache.setdefault(key, {})
    if sub not in recent:
        if len(recent) >= keep:
            del recent[next(iter(recent))]
        recent[sub] = make()
    return recent[sub]


class DataOrder:
    """This rank's view of the order (see the module doc). `n` and `shuffle` describe the data when `next_items` is
    given no layout (a plain dataset of n items)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True,
                 sampling: str = "auto-weighting"):
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.sampling = seed, shuffle, sampling
        self.slot, self.entry_slots, self.positions = 0, {}, {}
        self._legacy: Optional[int] = None  # `consumed` of a pre-bucket checkpoint, applied at the first draw
        self._perms: dict = {}   # stream key -> {epoch: permutation}, the two latest (for a batch across epochs)
        self._rounds: dict = {}  # entry name -> {(round, sizes, global batch): schedule}, the two latest
        self._single: Optional[Layout] = None  # the layout of `n` items, made once

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    # ---------------------------------------------------------------- drawing
    def _perm(self, j: int, stream: Stream, epoch: int) -> Optional[np.ndarray]:
        if not stream.shuffle:
            return None

        def make():
            seed = ((self.seed * 1_000_003 + epoch) % 2 ** 64 if j == 0  # torch seeds are unsigned 64-bit
                    else _hash_int("perm", self.seed, stream.key, epoch))
            # torch.randperm's values (the same in any integer dtype), written into numpy's memory (which tracemalloc
            # sees; torch's it does not)
            n = len(stream.items)
            perm = np.empty(n, dtype=np.int32 if n <= np.iinfo(np.int32).max else np.int64)
            torch.randperm(len(perm), generator=torch.Generator().manual_seed(seed), out=torch.from_numpy(perm))
            return perm
        return _latest(self._perms, stream.key, epoch, make)

    def _entry(self, layout: Layout) -> int:
        if len(layout.entries) == 1:
            return 0
        weights = [w * (sum(layout.streams[j].size for j in ids) if self.sampling == "auto-weighting" else 1)
                   for _, w, ids in layout.entries]
        u = _hash_int("entry", self.seed, self.slot) / 2 ** 63 * sum(weights)
        for e, w in enumerate(weights):
            u -= w
            if u < 0:
                return e
        return len(weights) - 1

    def _stream(self, layout: Layout, e: int, k: int) -> int:
        """The stream of entry e's k-th batch (see the module doc, step 2)."""
        name, _, ids = layout.entries[e]
        if len(ids) == 1:
            return ids[0]
        sizes, gb = [layout.streams[j].size for j in ids], self.global_batch

        def batches_before(r):  # in rounds 0 .. r-1
            return sum(n * r // gb for n in sizes)

        lo, hi = 0, (k + len(sizes)) * gb // sum(sizes) + 1  # batches_before(hi) > k: the round is in [lo, hi)
        while hi - lo > 1:  # the round r with batches_before(r) <= k < batches_before(r + 1)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if batches_before(mid) <= k else (lo, mid)
        rnd, pos = lo, k - batches_before(lo)

        def make():
            counts = [n * (rnd + 1) // gb - n * rnd // gb for n in sizes]
            sched = np.repeat(np.asarray(ids, dtype=np.int32), counts)
            if all(layout.streams[j].shuffle for j in ids):
                g = torch.Generator().manual_seed(_hash_int("round", self.seed, name, rnd))
                sched = sched[torch.randperm(len(sched), generator=g).numpy()]
            return sched
        return int(_latest(self._rounds, name, (rnd, tuple(sizes), gb), make)[pos])

    def _apply_legacy(self, layout: Layout) -> None:
        consumed, self._legacy = self._legacy, None
        if len(layout.streams) != 1:
            raise DataError("this checkpoint's data position was saved before fewstep had buckets and several "
                            "entries; resume it with the data it was trained on (one entry, one image size)")
        self.slot = consumed // self.global_batch
        self.entry_slots = {layout.entries[0][0]: self.slot}
        self.positions = {layout.streams[0].key: consumed}

    def next_items(self, layout: Optional[Layout] = None) -> list[tuple[int, int]]:
        """This rank's next micro-batch: (dataset index, caption variant) pairs, all from one bucket."""
        if layout is None:
            self._single = self._single or Layout.single(self.n, self.shuffle)
            layout = self._single
        if self._legacy is not None:
            self._apply_legacy(layout)
        e = self._entry(layout)
        name = layout.entries[e][0]
        k = self.entry_slots.get(name, 0)
        j = self._stream(layout, e, k)
        stream, gb = layout.streams[j], self.global_batch
        n, c = len(stream.items), self.positions.get(stream.key, 0)
        length = n if n < gb else -(-n // gb) * gb  # positions per epoch (module doc, step 3)
        if n >= gb and c % length + gb > length:  # the batch would span two epochs: it starts the next one
            c += length - c % length
        out = []
        for p in range(c + self.rank * self.batch_size, c + (self.rank + 1) * self.batch_size):
            epoch, q = divmod(p, length)
            perm = self._perm(j, stream, epoch)
            i = int(stream.items[perm[q % n] if perm is not None else q % n])
            k_var = int(layout.variants[i]) if len(layout.variants) else 1
            out.append((i, _hash_int("caption", self.seed, stream.key, p) % k_var if k_var > 1 else 0))
        self.positions[stream.key] = c + gb
        self.entry_slots[name] = k + 1
        self.slot += 1
        return out

    def peek_items(self, layout: Optional[Layout] = None) -> list[tuple[int, int]]:
        """The micro-batch `next_items` draws next, without drawing it: the counters stay where they are (a
        checkpoint taken after a peek resumes where one taken before it does)."""
        saved = self.slot, dict(self.entry_slots), dict(self.positions), self._legacy
        try:
            return self.next_items(layout)
        finally:
            self.slot, self.entry_slots, self.positions, self._legacy = saved

    def next_indices(self, layout: Optional[Layout] = None) -> list[int]:
        return [i for i, _ in self.next_items(layout)]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Counters only; `consumed` (samples drawn by all ranks) is what fewstep saved before buckets. A pre-bucket
        position not applied yet (no draw since the load) is saved as it was loaded."""
        if self._legacy is not None:
            return {"consumed": self._legacy}
        return {"consumed": self.slot * self.global_batch, "slot": self.slot, "entries": dict(self.entry_slots),
                "positions": dict(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        if "slot" not in state:  # a checkpoint from before buckets: one stream at `consumed`
            self._legacy = int(state["consumed"])
            return
        self.slot, self._legacy = int(state["slot"]), None
        self.entry_slots = {str(k): int(v) for k, v in state["entries"].items()}
        self.positions = {str(k): int(v) for k, v in state["positions"].items()}
