#!/usr/bin/env python
"""Private host memory a rank holds per training image: the data index and the data order, at data-set scale.

    python bench/data_index.py --samples 1000000

Writes a `SampleTable` of n synthetic samples (paths, captions, plans, digests of realistic lengths; two entries, a
few buckets, a third of the images with two captions), then, in a fresh process as a rank would, opens it and builds
the trainer's dataset (`CacheSet`, `CachedDataset`) and data order, and draws batches across an epoch boundary of the
largest bucket. Reports: the private memory allocated by Python and numpy (tracemalloc), the RSS growth (which also
counts the table's pages the rank touched: page cache, shared by the ranks of a node), the table's size on disk, and
the set-up time. Then one rank's cache-fill check at a restart (`CacheSet.share`, rank 0 of 8 sharing the cache
directory, every file present): its time and peak transient memory. No image or cache file is read (the check's
file lookups answer "present"): this measures the index, not the data or the filesystem.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc


def synthetic_samples(n: int):
    from fewstep.data.buckets import Plan
    from fewstep.data.dataset import Sample

    for i in range(n):
        caption = f"a photograph of subject {i}, shot outdoors in soft daylight, with a shallow depth of field"
        captions = [caption, f"subject {i}, outdoors"] if i % 3 == 0 else []
        w, h = ((1024, 1024), (1152, 896), (896, 1152))[i % 3]
        yield Sample(f"/lustre/datasets/photos/shard-{i // 10_000:05d}/{i:09d}.jpg", caption, captions, i % 2,
                     Plan((w, h), (w + 64, h + 48), (32, 24), (3000, 2000)), f"{i:032x}")


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(folder: str, steps: int) -> dict:
    """One rank's view of the table in `folder` (run in a fresh process)."""
    import torch

    from fewstep.data.backends import ImageEntry
    from fewstep.data.cache import CachedDataset, CacheSet, atomic_save
    from fewstep.data.order import DataOrder
    from fewstep.data.table import SampleTable

    entries = [ImageEntry(id=e, image_dir=".", resolution=1024.0) for e in ("a", "b")]
    rss0, t0 = rss(), time.perf_counter()
    tracemalloc.start()
    table = SampleTable(folder)
    caches = CacheSet(table, entries, [""], os.path.join(folder, "..", "cache"), "m")
    atomic_save({"prompt_embeds": torch.ones(3, 4)}, caches.extra_cache.text_path(""))
    dataset = CachedDataset(caches, entries, 16)
    order = DataOrder(len(dataset), 4, 3, 8, seed=0)
    setup = time.perf_counter() - t0
    biggest = max(dataset.layout.streams, key=lambda s: len(s.items))
    state = order.state_dict()
    gb = order.global_batch  # an epoch is whole global batches (fewstep.data.order): start at its last one, so that
    state["positions"] = {s.key: -(-len(s.items) // gb) * gb - gb  # the draws hold two epochs' permutations
                          for s in dataset.layout.streams}
    order.load_state_dict(state)
    t1 = time.perf_counter()
    for _ in range(steps):
        order.next_items(dataset.layout)
    draw = (time.perf_counter() - t1) / steps
    held, grown = tracemalloc.get_traced_memory()[0], rss() - rss0
    import fewstep.data.cache as cache_module

    cache_module.os.path.exists = lambda path: True  # a restart: the cache is full (stat costs are the filesystem's)
    tracemalloc.reset_peak()
    t2 = time.perf_counter()
    for root in caches.roots():
        lat, txt = caches.share(root, 0, 8)
        assert not lat and not txt
    share = time.perf_counter() - t2
    share_peak = tracemalloc.get_traced_memory()[1] - held
    tracemalloc.stop()
    return {"samples": len(table), "private_bytes_per_sample": held / len(table),
            "share_s": share, "share_peak_bytes_per_sample": share_peak / len(table),
            "rss_growth_bytes_per_sample": grown / len(table), "setup_s": setup,
            "draw_ms": draw * 1e3, "largest_stream": len(biggest.items)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=20, help="batches drawn (across an epoch boundary)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: the fresh process's table folder
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps)))
        return
    from fewstep.data.table import write_table

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "samples")
        t0 = time.perf_counter()
        write_table(folder, list(synthetic_samples(args.samples)))
        written = time.perf_counter() - t0
        disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        out = subprocess.run([sys.executable, __file__, "--measure", folder, "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True).stdout
    result = {**json.loads(out.splitlines()[-1]), "table_bytes_per_sample": disk / args.samples,
              "write_s": written}
    print(json.dumps(result, indent=1))
    print(f"\n| samples | private B/sample | RSS growth B/sample | table on disk B/sample | set-up s | draw ms "
          f"| fill check s (1 of 8) | its peak B/sample |\n|---|---|---|---|---|---|---|---|\n"
          f"| {result['samples']:,} | {result['private_bytes_per_sample']:.1f} | "
          f"{result['rss_growth_bytes_per_sample']:.1f} | {result['table_bytes_per_sample']:.1f} | "
          f"{result['setup_s']:.2f} | {result['draw_ms']:.2f} | {result['share_s']:.2f} | "
          f"{result['share_peak_bytes_per_sample']:.0f} |")


if __name__ == "__main__":
    main()
