"""What a checkpoint records of the data it was trained on, and what a resume says changed since.

The data order's state is counters keyed by name (`fewstep.data.order`): a resume continues from the saved positions
whatever the data are now. With the same data, seed, entry sampling and global batch it draws exactly the samples an
uninterrupted run would have drawn; with anything else it cannot, and the resume says so in one warning naming what
differs (an entry's image count, its buckets, its images or crops, its repeats, ...). Adding images to a run on
purpose is allowed: the warning is there so that an unintended change (a folder that grew, a resolution edited in
the data config) is not silent.

What is compared is what decides which samples are drawn: per bucket (stream), its images' content digests, crops
and caption counts, in order. A caption's text is not: an edit changes what a sample says, not which samples come.
The record is a few lines per bucket whatever the data set's size, and is made on one rank in blocks of samples
(a bounded transient).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

BLOCK = 1 << 16  # samples hashed at a time
SHOWN = 6        # changes named in the warning; the rest are counted


def data_record(dataset, seed: int, sampling: str, global_batch: int) -> dict:
    """The record of `dataset` (a `CachedDataset`: its `layout` and `samples`) saved in each checkpoint."""
    record = {"samples": len(dataset), "seed": int(seed), "sampling": sampling, "global_batch": int(global_batch)}
    layout, samples = getattr(dataset, "layout", None), getattr(dataset, "samples", None)
    if layout is None or samples is None:  # a plain dataset (tests): its size is all there is
        return record
    record["entries"] = {name: float(probability) for name, probability, _ in layout.entries}
    record["buckets"] = {s.key: {"images": len(s.items), "repeats": int(s.repeats), "shuffle": bool(s.shuffle),
                                 "digest": _stream_digest(samples, layout.variants, s.items)} for s in layout.streams}
    return record


def _stream_digest(samples, variants, items) -> str:
    """A digest of what the stream's positions map to: each item's image content, its plan (bucket, resize, crop)
    and its caption count (`variants`: the layout's, per dataset index; empty: one each), in the stream's order. Not
    its dataset index: an image added to another entry shifts the indices and changes nothing here."""
    h = hashlib.sha256()
    for start in range(0, len(items), BLOCK):
        ids = np.asarray(items[start:start + BLOCK])
        counts = variants[ids] if len(variants) else np.ones(len(ids))  # in the layout's smallest dtype:
        for part in (samples.digests[ids], samples.plans[ids], counts.astype(np.int64)):  # hashed as int64 always
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()[:24]


def data_changes(saved: dict | None, now: dict) -> list[str]:
    """What differs between a checkpoint's record and this run's, in words; [] if nothing (or the checkpoint has
    no record: those before 2026-12-07)."""
    if not saved:
        return []
    found = [f"{what} {saved.get(key)} -> {now.get(key)}"
             for key, what in (("seed", "seed"), ("sampling", "data_backend_sampling"),
                               ("global_batch", "global batch (train_batch_size x ranks)"))
             if saved.get(key) != now.get(key)]
    if "buckets" not in saved or "buckets" not in now:
        if saved.get("samples") != now.get("samples"):
            found.append(f"{saved.get('samples')} -> {now.get('samples')} samples")
        return found
    was, new = saved.get("entries", {}), now.get("entries", {})
    found += [f"entry {name!r} is new" for name in new if name not in was]
    found += [f"entry {name!r} is gone" for name in was if name not in new]
    kept = [name for name in was if name in new]
    if kept != [name for name in new if name in was]:  # a slot's entry is drawn by the entries' order
        found.append(f"entries reordered: {', '.join(kept)} -> {', '.join(n for n in new if n in was)}")
    for name in (n for n in new if n in was):
        found += _entry_changes(name, was[name], new[name], _of(saved["buckets"], name), _of(now["buckets"], name))
    return found


def _of(buckets: dict, entry: str) -> dict:
    """The entry's buckets, by their size "WxH" (a stream's key is "<entry id>|<W>x<H>")."""
    return {key.rsplit("|", 1)[1]: b for key, b in buckets.items() if key.rsplit("|", 1)[0] == entry}


def _entry_changes(name: str, was_p: float, new_p: float, was: dict, new: dict) -> list[str]:
    found = [] if was_p == new_p else [f"entry {name!r}: probability {was_p:g} -> {new_p:g}"]
    images = [sum(b["images"] for b in side.values()) for side in (was, new)]
    if images[0] != images[1]:
        found.append(f"entry {name!r}: {images[0]} -> {images[1]} images")
    elif sorted(was) != sorted(new):
        found.append(f"entry {name!r}: buckets {', '.join(sorted(was))} -> {', '.join(sorted(new))} (resolution or "
                     "crop settings)")
    elif any(was[k]["digest"] != new[k]["digest"] for k in new):
        found.append(f"entry {name!r}: other images, crops or caption counts (as many images)")
    for key, what in (("repeats", "repeats"), ("shuffle", "shuffle")):
        before, after = ({b[key] for b in side.values()} for side in (was, new))
        if before != after and before and after:
            found.append(f"entry {name!r}: {what} {'/'.join(map(str, sorted(before)))} -> "
                         f"{'/'.join(map(str, sorted(after)))}")
    return found


def unrecorded_changes(entries) -> list[str]:
    """For a checkpoint without a record (saved before 2026-12-07), the one change fewstep itself made to what the
    same configs train: a config's `resolution` used to replace every entry's own, and is now the default of the
    entries that set none (SimpleTuner's rule)."""
    return [f"entry {e.id!r}: its own resolution {e.resolution:g}, where the config's {e.config_resolution:g} replaced "
            "it before 2026-12-07" for e in entries
            if e.config_resolution is not None and e.config_resolution != e.resolution]


def resume_warning(saved: dict | None, now: dict, entries, checkpoint: str) -> str | None:
    """The warning of a resume from `checkpoint` (its path) whose record is `saved` (None: it has none) onto data
    recorded as `now`, from `entries` (the data config's image entries); None if nothing changed."""
    changed = data_changes(saved, now) if saved else unrecorded_changes(entries)
    return changes_warning(os.path.basename(os.path.normpath(checkpoint)), changed) if changed else None


def changes_warning(step_name: str, changes: list[str]) -> str:
    """The resume's one warning line about `changes` (not empty)."""
    shown = "; ".join(changes[:SHOWN]) + (f"; and {len(changes) - SHOWN} more" if len(changes) > SHOWN else "")
    return (f"the data differ from {step_name}'s ({shown}): the data order continues from its saved positions, so "
            "this run does not draw the samples an uninterrupted run would have")
