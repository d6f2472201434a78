"""The trainer's data preparation, behind one call: `build_dataset(cfg, adapter, info)`.

1. Scan (`scan_images`): rank 0 lists every captioned image and looks each up in the probe memo (a stat, no read);
   the images it has not seen are probed (content hash of every byte + header size) by all ranks, each its share,
   and rank 0 merges them, plans every image's bucket and crop, and broadcasts the samples. A first scan of a large
   data set is spread over the whole job; a restart reads the memo, the caption files and a stat of each image
   (rank 0, many at a time: `captions.in_threads`).
2. Cache: in each cache directory, every rank that sees it encodes its share (so a node-local cache is filled once per
   node), with the encoders on its own device, stored in the training dtype and read lazily.

Work that takes different times on different ranks runs inside `distributed.uneven_work` (a store-based wait with
no deadline): never inside a collective bound by `distributed_timeout_seconds`.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from typing import Callable, Optional

import numpy as np
import torch

from fewstep import faults
from fewstep.data.backends import DataConfig, entry_defaults, load_data_config
from fewstep.data.buckets import Geometry
from fewstep.data.cache import CachedDataset, CacheSet, model_key
from fewstep.data.captions import in_threads
from fewstep.data.dataset import ProbeMemo, list_images, plan_samples
from fewstep.data.errors import DataError
from fewstep.data.placeholders import placeholders
from fewstep.data.table import SampleTable, StringColumn, write_table
from fewstep.engine import distributed
from fewstep.engine.sharing import sharing_group
from fewstep.jsonfile import load_json, save_json
from fewstep.metrics import log_main
from fewstep.validation_settings import library_prompts, validation_negative

MEMO_NAME = "data_digests.json"  # in output_dir
INDEX_NAME = "data_index"  # in output_dir: the last scan's files (`scan_images`)


def resolution_multiple(adapter, name_or_path: str) -> int:
    """Image sides must be a multiple of this (VAE factor x patch factor), read from the VAE's config: the VAE is
    built on the meta device, so no weights are read."""
    src = adapter.resolve(name_or_path)
    config = adapter.vae_cls.load_config(src, subfolder="vae")
    with torch.device("meta"):
        vae = adapter.vae_cls.from_config(config)
    return adapter.vae_scale_factor(vae) * adapter.patch_factor(None)


def summary(config: DataConfig, samples: SampleTable, skipped: dict[str, Counter]) -> list[str]:
    """One line per image entry: images used, their buckets, the crop rule, what was skipped and why, and how many
    have only an empty caption."""
    lines, empty = [], samples.empty_caption_counts()
    for e, entry in enumerate(config.images):
        targets, first, counts = np.unique(samples.targets[samples.entries == e], axis=0, return_index=True,
                                           return_counts=True)
        sizes = {f"{w}x{h}": int(n) for _, _, (w, h), n in sorted(zip(-counts, first, targets, counts))}
        buckets = ", ".join(f"{b} x{n}" for b, n in sizes.items())  # the largest first, ties in the data's order
        line = (f"data '{entry.id}': {sum(sizes.values())} images in {len(sizes)} bucket(s) [{buckets}], "
                f"{entry.shown_resolution}, {entry.shown_crop}, repeats {entry.repeats}, probability "
                f"{entry.probability:g}")
        if not entry.strategy_explicit:
            line += f", captions from {entry.caption_extension} files (fewstep's default; SimpleTuner's is filename)"
        if skipped.get(entry.id):
            line += "; skipped " + ", ".join(f"{n} {why}" for why, n in skipped[entry.id].items())
        if e < len(empty) and empty[e]:
            line += (f"; warning: {empty[e]} with an empty caption (a caption file of blank lines?): they train on "
                     "the empty prompt")
        lines.append(line)
    return lines


def scan_images(config: DataConfig, multiple: int, memo_path: str, stop: Optional[Callable[[], bool]] = None
                ) -> Optional[tuple[SampleTable, dict[str, Counter], int]]:
    """Every usable image with its plan, the skip counts per entry, and how many images were probed (read) in this
    scan over all ranks (collective; the same result on every rank). `stop` (the trainer's preemption flag): checked
    between the probes; if it is set on any rank, the probes end early on every rank, what was read is remembered
    in the memo (the next start reads only the rest), and None is returned.

    Only rank 0 holds the memo and the listing. The scan's files sit in a folder of `data_index/` beside the memo
    (the run directory, which every rank shares): rank 0 writes the paths of the unseen images there, each rank
    probes its slice and writes its records (`ProbeMemo.record`) there, and rank 0 merges them, plans every image
    and writes the samples as a `SampleTable`, which every rank memory-maps. No image's data goes through a
    collective (a pickled list of millions of samples would pass through the GPU under NCCL, and be held whole by
    every rank); the collectives carry the folder's name and the skip counts.
    """
    rank, world = distributed.rank(), distributed.world_size()
    scan = None
    with distributed.uneven_work("data listing"):  # rank 0 alone walks the folders and stats each image
        if rank == 0:
            memo, listed = ProbeMemo(memo_path), list_images(config)
            paths = list(dict.fromkeys(path for _, path, _ in listed))  # a folder in several entries: its files once
            known = dict(zip(paths, in_threads(memo.lookup, paths)))  # None: not seen before, or changed
            scan = _new_scan_folder(os.path.join(os.path.dirname(os.path.abspath(memo_path)), INDEX_NAME))
            StringColumn.save(scan, "unseen", (path for path in paths if known[path] is None))
            faults.work_at("scan")
    scan = distributed.broadcast_object(scan)
    with distributed.uneven_work("data probe"):  # each rank hashes its share of the unseen images
        unseen = StringColumn.open(scan, "unseen")
        save_json(os.path.join(scan, f"probes-rank{rank}.json"),
                  _probe_share([unseen[k] for k in range(rank, len(unseen), world)], rank, stop))
    stopped = stop is not None and distributed.any_rank(stop())
    found = None
    with distributed.uneven_work("data plan"):  # a DataError here reaches every rank
        if rank == 0:
            fresh = {}
            for r in range(world):
                fresh.update(load_json(os.path.join(scan, f"probes-rank{r}.json"), DataError, "probe records"))
            memo.update(memo.restamped(fresh))
            if not stopped:
                probes = [known[path] or ProbeMemo.probe_of(fresh[os.path.abspath(path)]) for _, path, _ in listed]
                samples, skipped = plan_samples(config, multiple, listed, probes)
                write_table(os.path.join(scan, "samples"), samples)
                found = (skipped, len(unseen))
            memo.save()  # a stopped scan's probes too: the next start reads only the rest
    if stopped:
        return None
    skipped, probed = distributed.broadcast_object(found)
    return SampleTable(os.path.join(scan, "samples")), skipped, probed


def _new_scan_folder(index: str) -> str:
    """A new folder for this scan under `index`; earlier scans' folders are removed (the run directory is this run's
    alone, so no other process reads them)."""
    os.makedirs(index, exist_ok=True)
    for name in os.listdir(index):
        shutil.rmtree(os.path.join(index, name), ignore_errors=True)
    folder = os.path.join(index, f"scan-{uuid.uuid4().hex[:12]}")
    os.makedirs(folder)
    return folder


def _probe_share(paths: list[str], rank: int, stop: Optional[Callable[[], bool]]) -> dict[str, list]:
    """This rank's probe records, up to the image where `stop` said to stop."""
    records = {}
    try:
        for path in paths:
            if stop is not None and stop():
                break
            faults.work_at("probe")  # the tests' delay in the middle of a scan
            key, record = ProbeMemo.record(path)
            records[key] = record
        return records
    except FileNotFoundError as e:  # listed on rank 0's node, absent here: node-local data
        raise DataError(f"image '{e.filename}' (listed by rank 0) does not exist on rank {rank}: every rank reads the "
                        "images, so image_dir must be on a shared filesystem or copied to the same path on every "
                        "node") from None


def read_data_config(cfg):
    """The data config (`data_backend_config`) read and checked: its mistakes are reported before the model is
    resolved (for a hub id not yet cached, that is a download)."""
    if cfg.data_backend_config is None:
        raise DataError("'data_backend_config' is required (a multidatabackend.json listing image entries)")
    return load_data_config(cfg.data_backend_config, entry_defaults(cfg), variables=placeholders(cfg))


def build_dataset(cfg, adapter, info: distributed.DistInfo, source: str | None = None, data=None,
                  stop: Optional[Callable[[], bool]] = None) -> Optional[tuple[CachedDataset, int, bool]]:
    """Scan and plan the images of the data config (`data`: `read_data_config`'s, read here if not given), and fill
    the latent/embedding caches (collective). `stop` (the trainer's preemption flag): checked between the scan's
    image reads and the fill's batches; if it is set on any rank, both end early on every rank and None is returned
    (what was read or cached is kept: the next start does the rest).

    `source`: the model folder to read the VAE and text encoders from (`engine.loading.local_model`'s answer: for a
    hub id, the snapshot of the commit every rank trains; the cache is keyed by its files' content); default
    `pretrained_model_name_or_path`. Rank 0 prints what the data config produced before the fill starts. Returns
    the dataset, the first entry's square size (logs, run info) and whether every entry shuffles."""
    source = source or cfg.pretrained_model_name_or_path
    data = data if data is not None else read_data_config(cfg)
    multiple = resolution_multiple(adapter, source)
    scanned = scan_images(data, multiple, os.path.join(cfg.output_dir, MEMO_NAME), stop)
    if scanned is None:
        return None
    samples, skipped, probed = scanned
    log = summary(data, samples, skipped)
    if probed:
        log.append(f"data scan: read {probed} new image(s) on {info.world_size} rank(s) "
                   f"({len(samples)} usable; an image read in an earlier run is remembered, not read again)")
    extra = [""] + [p for p in (cfg.validation_prompt, validation_negative(cfg, adapter)) if p]
    with distributed.uneven_work("user_prompt_library"):  # read once, by rank 0: every rank renders what it cached
        try:
            library = library_prompts(cfg) if info.is_main else None
        except ValueError as e:
            raise DataError(str(e)) from None
    library = distributed.broadcast_object(library)
    with distributed.uneven_work("model key"):  # reads the encoders' files
        key = model_key(cfg.model_family, source)
    keys = distributed.all_gather_object(key)
    if len(set(keys)) > 1:  # per-node copies that differ would fill different cache folders as if they were one
        raise DataError(f"the VAE / text-encoder files of {cfg.pretrained_model_name_or_path} differ between ranks "
                        f"(ranks {[r for r, k in enumerate(keys) if k != keys[0]]} differ from rank 0): every node "
                        "needs the same copy of the model")
    cached = extra + [p for _, p in library if p not in extra]  # the library's: cached, read from disk when rendered
    with distributed.uneven_work("cache folders"):  # created on every rank: a node-local one may fail on one node
        caches = CacheSet(samples, data.images, cached, cfg.cache_dir or os.path.join(cfg.output_dir, "cache"),
                          key, data.default_text_cache_dir, data.text_batch_sizes,
                          torch.bfloat16 if cfg.bf16 else torch.float32, cfg.text_encoder_batch_size)
    shares, sizes = {}, set()
    for root in caches.roots():  # the same roots in the same order on every rank: sharing_group is collective
        group = sharing_group(root)
        shares[root] = caches.share(root, group.index, group.size)
        sizes.add(group.size)
    lat, txt = sum(len(a) for a, _ in shares.values()), sum(len(b) for _, b in shares.values())
    counts, _ = distributed.reduce_step({"lat": lat, "txt": txt})
    if counts["lat"] or counts["txt"]:
        log.append(f"caching latents and prompt embeddings: {lat} + {txt} on this rank, "
                   f"{'/'.join(map(str, sorted(sizes)))} rank(s) per cache directory ({len(shares)})")
    for line in log:
        log_main(info.is_main, line)
    with distributed.uneven_work("cache fill"):
        if lat or txt:
            dtype = torch.bfloat16 if info.device.type == "cuda" and cfg.bf16 else torch.float32  # encoders
            comps = adapter.load(source, dtype=dtype, with_denoiser=False)
            for m in [comps.vae, *comps.text_encoders]:
                m.to(info.device)

            def encode_images(px):
                faults.work_at("encode")  # the tests' delay in the middle of a fill
                return adapter.encode_images(comps.vae, px)

            for root, (mine_lat, mine_txt) in shares.items():
                caches.cache_at(root).fill(mine_lat, mine_txt, encode_images,
                                           lambda p: adapter.split_cond(adapter.encode_prompts(comps, p)),
                                           batch_size=cfg.vae_batch_size, stop=stop)
            del comps
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
        faults.work_at("cache")
    if stop is not None and distributed.any_rank(stop()):
        return None
    dataset = CachedDataset(caches, data.images, multiple, extra, library)
    first = data.images[samples[0].entry]
    return dataset, Geometry(first, multiple).square[0], all(e.shuffle for e in data.images)

