"""fewstep.data.table: the scanned samples as memory-mapped columns, and what a rank holds per sample."""
import os
import tracemalloc

import numpy as np
import pytest
import torch

from fewstep.data.backends import ImageEntry, load_data_config
from fewstep.data.buckets import Plan
from fewstep.data.cache import CachedDataset, CacheSet, atomic_save
from fewstep.data.dataset import Sample
from fewstep.data.order import DataOrder
from fewstep.data.prepare import INDEX_NAME, scan_images
from fewstep.data.table import SampleTable, write_table
from fewstep_testing import write_dataset


def _samples(n, entries=1):
    return [Sample(f"/data/part-{i % 7}/img_{i:07d}.jpg", f"caption {i} of a data set",
                   [f"caption {i} of a data set", f"another caption {i}"] if i % 3 == 0 else [],
                   i % entries, Plan((32 + 8 * (i % 2), 32), (40, 36), (i % 5, 2), (400 + i, 300)), f"{i:032x}")
            for i in range(n)]


def test_a_table_gives_back_the_samples_it_was_written_with(tmp_path):
    samples = _samples(50, entries=2)
    samples[1] = Sample("/données/ünïcode ✓.png", "légende — ✓", [], 1, Plan((32, 32), (32, 32)), "ab" * 16)
    samples[2].captions = [""]  # an empty caption is a caption
    samples[2].caption = ""
    table = SampleTable.written(str(tmp_path / "t"), samples)
    assert len(table) == 50 and list(table) == samples and table[-1] == samples[-1]
    assert [table.captions(i) for i in range(50)] == [s.captions for s in samples]
    assert table.caption(0, 1) == "another caption 0" and table[1].plan.source is None
    assert table.variants().tolist() == [len(s.captions) for s in samples]
    with pytest.raises(IndexError):
        table[50]
    assert isinstance(table.plans, np.memmap) and isinstance(table.paths.blob, np.memmap)  # read in place


def test_samples_with_only_an_empty_caption_are_counted_per_entry(tmp_path, monkeypatch):
    """A caption file of blank lines gives the caption "": such samples train on the empty prompt, and the data
    summary says how many each entry has (a sample with one real caption among empty ones is not counted). Counted
    in blocks: the block size does not change the counts."""
    import fewstep.data.table as table_module

    samples = _samples(40, entries=3)
    for i, caps in ((1, [""]), (2, ["", ""]), (4, ["", "a real one"]), (5, [""]), (39, [""])):
        samples[i].captions, samples[i].caption = caps, caps[0]
    table = SampleTable.written(str(tmp_path / "t"), samples)
    expect = [0, 0, 0]
    for i in (1, 2, 5, 39):
        expect[samples[i].entry] += 1
    assert table.empty_caption_counts().tolist() == expect and sum(expect) == 4
    monkeypatch.setattr(table_module, "BLOCK", 3)
    assert table.empty_caption_counts().tolist() == expect
    plain = SampleTable.written(str(tmp_path / "u"), _samples(10, entries=2))
    assert plain.empty_caption_counts().tolist() == [0, 0]
    from types import SimpleNamespace

    from fewstep.data.prepare import summary

    entries = [SimpleNamespace(id=f"e{k}", shown_crop="center crop", shown_resolution="resolution 32 px",
                               repeats=0, probability=1.0, strategy_explicit=True) for k in range(3)]
    lines = summary(SimpleNamespace(images=entries), table, {})
    warned = [k for k, line in enumerate(lines) if "with an empty caption (a caption file of blank lines?)" in line]
    assert warned == [k for k in range(3) if expect[k]] and f"warning: {expect[warned[0]]} with an empty" in \
        lines[warned[0]]
    assert not any("empty caption" in line for line in summary(SimpleNamespace(images=entries[:2]), plain, {}))


def test_an_interrupted_write_leaves_no_table(tmp_path, monkeypatch):
    """The table is written in a temporary folder and renamed: a reader never opens half a table."""
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(OSError):
        write_table(str(tmp_path / "t"), _samples(3))
    assert os.listdir(tmp_path) == []


def test_each_cache_folder_encodes_an_image_once_per_plan(tmp_path):
    """An image listed in several entries is encoded once per cache folder and plan: entries a and b share the
    default folder, c keeps its latents in its own; an image in a and c is encoded in both folders, one with a
    different crop twice. A rank finds this from the table's `image` column (a few bytes a sample); the whole
    table's digests and plans were sorted by every rank at every start before (about 250 B a sample)."""
    def sample(i, entry, digest, x=0):
        return Sample(f"/d/{entry}/{i}.png", f"c{i}", [], entry, Plan((32, 32), (40, 36), (x, 2), (40, 36)),
                      f"{digest:032x}")

    samples = [sample(0, 0, 1), sample(1, 1, 1), sample(2, 2, 1),  # one image in a, b and c
               sample(3, 2, 2), sample(4, 0, 2),  # in c first, then a: encoded in both, each its first here
               sample(5, 1, 3, x=0), sample(6, 0, 3, x=4),  # one image with two crops: two latents
               sample(7, 2, 4), sample(8, 2, 4), sample(9, 1, 5)]  # repeated in c; once in b
    table = SampleTable.written(str(tmp_path / "t"), samples)
    assert table.images.tolist() == [0, 0, 0, 3, 3, 5, 6, 7, 7, 9]
    own = str(tmp_path / "own")
    entries = [ImageEntry(id=e, image_dir=".", resolution=32.0) for e in "ab"]
    entries.append(ImageEntry(id="c", image_dir=".", resolution=32.0, vae_cache_dir=own))
    caches = CacheSet(table, entries, [""], str(tmp_path / "cache"), "m")
    default, own = caches.latent_cache[0].root, caches.latent_cache[2].root
    assert caches.work(default)[0].tolist() == [0, 4, 5, 6, 9]
    assert caches.work(own)[0].tolist() == [2, 3, 7]
    empty = CacheSet(SampleTable.written(str(tmp_path / "e"), []), entries, [""], str(tmp_path / "cache"), "m")
    assert len(empty.samples) == 0 and all(len(empty.work(r)[0]) == 0 for r in empty.roots())


def test_listing_a_cache_folders_images_needs_a_few_bytes_per_sample(tmp_path):
    """The cache-fill check at every start (every rank): its peak transient memory per sample. Sorting the table's
    digests and plans took about 250 B a sample (2.5 GiB per rank at 10 million images)."""
    n = 100_000
    entries = [ImageEntry(id="a", image_dir=".", resolution=32.0), ImageEntry(id="b", image_dir=".", resolution=32.0)]
    table = SampleTable.written(str(tmp_path / "t"), _samples(n, entries=2))
    caches = CacheSet(table, entries, [""], str(tmp_path / "cache"), "m")
    tracemalloc.start()
    latents = caches.work(caches.roots()[0])[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # 28 B: the prompt ids (1.3 distinct captions a sample, 4 B each: found, joined, sorted), then the latents'
    # sample indices (8 B, twice), the image ids (4 B) and masks
    assert len(latents) == n and peak / n < 35, peak / n


def _held_after_three_draws(tmp_path, table, entries):
    """The private memory (tracemalloc) a rank's dataset and data order hold after three draws; the indices drawn."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    caches = CacheSet(table, entries, [""], str(tmp_path / "cache"), "m")
    atomic_save({"prompt_embeds": torch.ones(3, 4)}, caches.extra_cache.text_path(""))
    dataset = CachedDataset(caches, entries, 8)
    order = DataOrder(len(dataset), 4, 1, 2, seed=0)
    drawn = [i for _ in range(3) for i, _ in order.next_items(dataset.layout)]
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held, drawn, dataset


def test_a_rank_holds_a_few_bytes_per_sample_not_the_samples(tmp_path):
    """What a rank keeps in private memory for a data set of n images: the dataset (paths, captions, plans are the
    table's, memory-mapped and shared by the node's ranks) and the data order's indices. A list of `Sample`s held
    about 1.3 KiB per image (7 GiB per rank at 5 million images)."""
    n = 100_000
    entries = [ImageEntry(id="a", image_dir=".", resolution=32.0), ImageEntry(id="b", image_dir=".", resolution=32.0)]
    table = SampleTable.written(str(tmp_path / "t"), _samples(n, entries=2))
    held, _, dataset = _held_after_three_draws(tmp_path, table, entries)
    # the streams' indices (8 B) and caption counts (1 B), two epochs of permutation (2 x 4 B), some slack
    assert held / n < 40, held / n
    assert dataset.samples[n - 1] == _samples(n, entries=2)[n - 1]


def test_the_scan_keeps_its_latest_table_in_the_run_directory(tmp_path):
    """Each scan writes its table in a new folder of data_index/ (beside the probe memo) and removes the earlier
    ones: the run directory does not fill up with a table per restart."""
    config = load_data_config(write_dataset(str(tmp_path), n=3))
    memo = str(tmp_path / "out" / "data_digests.json")
    first, _, probed = scan_images(config, 1, memo)
    again, _, probed_again = scan_images(config, 1, memo)
    assert (probed, probed_again) == (3, 0) and list(again) == list(first)
    scans = os.listdir(tmp_path / "out" / INDEX_NAME)
    assert len(scans) == 1 and os.path.dirname(again.folder) == str(tmp_path / "out" / INDEX_NAME / scans[0])


def test_a_file_name_that_is_not_utf8_is_scanned_and_read(tmp_path):
    """os.walk gives such a name with surrogate escapes (b"caf\xe9.png" -> "caf\udce9.png"); the table stores and
    gives back exactly that, so the image is found again (the first table version failed to encode it)."""
    backend = write_dataset(str(tmp_path), n=2)
    image_dir = os.path.dirname(load_data_config(backend).images[0].image_dir + "/")
    first = sorted(f for f in os.listdir(image_dir) if f.endswith(".png"))[0]
    stem = os.path.splitext(first)[0]
    for ext in (".png", ".txt"):
        os.rename(os.path.join(image_dir, stem + ext), os.fsdecode(os.fsencode(image_dir) + b"/caf\xe9" +
                                                                   ext.encode()))
    table, _, probed = scan_images(load_data_config(backend), 1, str(tmp_path / "out" / "memo.json"))
    odd = [s for s in table if "caf" in s.image_path]
    assert probed == 2 and len(odd) == 1 and os.path.exists(odd[0].image_path)
    assert os.fsencode(odd[0].image_path).endswith(b"caf\xe9.png")
    assert table.paths[-1] == table[len(table) - 1].image_path  # negative indices count from the end
    with pytest.raises(IndexError, match="not a variant 1"):
        table.caption(0, 1)


def test_a_ranks_memory_does_not_grow_with_repeats(tmp_path):
    """`repeats: 9` listed each image 10 times in its stream and shuffled 10 n positions (~160 bytes per image per
    rank); the stream lists each image once and its permutations are of the n images, in int32: what the README
    says a rank holds per image (about 24 bytes) whatever `repeats`."""
    n = 50_000
    entries = [ImageEntry(id="a", image_dir=".", resolution=32.0, repeats=9)]
    table = SampleTable.written(str(tmp_path / "t"), _samples(n))
    held, drawn, dataset = _held_after_three_draws(tmp_path, table, entries)
    assert held / n < 24, held / n
    assert all(0 <= i < n for i in drawn) and sum(s.size for s in dataset.layout.streams) == 10 * n
