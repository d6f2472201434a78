"""The latent/embedding cache at scale: stored in the training dtype, read lazily (memory per rank does not grow with
the data set), and image hashes remembered across runs."""
import glob
import os

import pytest
import torch

from fewstep.data import dataset as dataset_mod
from fewstep.data.backends import load_data_config
from fewstep.data.cache import CachedDataset, CacheSet
from fewstep.data.dataset import ProbeMemo, collect_samples
from fewstep_testing import sample_table, write_dataset


def _fill(tmp_path, samples, config, dtype, enc_img, enc_txt):
    caches = CacheSet(sample_table(tmp_path, samples), config.images, ["", "a validation prompt"],
                      str(tmp_path / "cache"), "m", dtype=dtype)
    for root in caches.roots():
        caches.cache_at(root).fill(*caches.share(root, 0, 1), enc_img, enc_txt)
    return caches


def _encoders(text_shape=(3, 4)):
    def enc_img(px):
        return px[:, :1] * 1.2345678  # fp32 values that bf16 cannot hold exactly

    def enc_txt(prompts):
        g = torch.Generator().manual_seed(len(prompts))
        return [{"prompt_embeds": e} for e in torch.randn(len(prompts), *text_shape, generator=g) + 0.1]
    return enc_img, enc_txt


def test_cache_is_stored_in_the_training_dtype(tmp_path):
    config = load_data_config(write_dataset(str(tmp_path), n=2))
    samples, _ = collect_samples(config, 1)
    enc_img, enc_txt = _encoders()
    ds16 = CachedDataset(_fill(tmp_path, samples, config, torch.bfloat16, enc_img, enc_txt), config.images, 1)
    ds32 = CachedDataset(_fill(tmp_path, samples, config, torch.float32, enc_img, enc_txt), config.images, 1)
    (lat16, txt16), (lat32, _) = ds16.item(0), ds32.item(0)
    assert lat16.dtype == txt16["prompt_embeds"].dtype == torch.bfloat16 and lat32.dtype == torch.float32
    assert torch.equal(lat16, lat32.to(torch.bfloat16)) and not torch.equal(lat16.float(), lat32)
    assert ds16.latent_path(0) != ds32.latent_path(0)  # one cache per storage dtype: never mixed up
    assert ds16.uncond["prompt_embeds"].dtype == torch.bfloat16


def test_files_sit_in_subfolders_and_a_flat_cache_is_read_in_place(tmp_path):
    """Each file sits in the subfolder named by its key's first two hex digits (a million images in one folder are
    slow on a parallel filesystem). A cache of the older flat layout is read where it is: nothing is encoded again,
    nothing moved (it may be read-only, or read by a run of the older version at the same time), and an entry it
    lacks is added beside the others."""
    config = load_data_config(write_dataset(str(tmp_path), n=3))
    samples, _ = collect_samples(config, 1)
    enc_img, enc_txt = _encoders()
    ds = CachedDataset(_fill(tmp_path, samples, config, torch.float32, enc_img, enc_txt), config.images, 1)
    want = [ds.item(i) for i in range(len(ds))]
    files = glob.glob(os.path.join(tmp_path, "cache", "**", "*.safetensors"), recursive=True)
    assert len(files) == 3 + 5  # 3 latents; 3 captions, the empty and the validation prompt
    flat = []
    for f in files:
        kind, sub, name = f.split(os.sep)[-3:]
        assert kind in ("latents", "text") and sub == name[:2] and len(name) == 32 + len(".safetensors")
        flat.append(os.path.join(os.path.dirname(os.path.dirname(f)), name))  # the flat layout of older caches
        os.replace(f, flat[-1])
        os.rmdir(os.path.dirname(f))
    os.remove(next(f for f in flat if os.sep + "latents" + os.sep in f))  # a latent the older cache lacks

    calls = []

    def enc_img_counted(px):
        calls.append(px.shape[0])
        return enc_img(px)

    def never(*_):
        raise AssertionError("encoded again")
    ds = CachedDataset(_fill(tmp_path, samples, config, torch.float32, enc_img_counted, never), config.images, 1)
    for (lat, text), (lat0, text0) in zip((ds.item(i) for i in range(len(ds))), want, strict=True):
        assert torch.equal(lat, lat0) and text.keys() == text0.keys()
        assert all(torch.equal(text[k], text0[k]) for k in text)
    assert calls == [1]  # only the missing latent, written flat beside the others
    assert sorted(glob.glob(os.path.join(tmp_path, "cache", "**", "*.safetensors"), recursive=True)) == sorted(flat)


def _peak_rss_since_reset() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as fh:  # Linux: VmHWM back to the current RSS
        fh.write("5")
    return _peak_rss_since_reset()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_a_damaged_cache_file_is_named_with_the_way_on(tmp_path):
    """A fill never rewrites a file that exists, so one cut short (a node crash before it reached the disk) or emptied
    failed every start at its first draw with safetensors' own words and no path. It is now one DataError naming
    the file and what to do; deleting it makes the next fill encode it again."""
    from fewstep.data.errors import DataError

    config = load_data_config(write_dataset(str(tmp_path), n=2))
    samples, _ = collect_samples(config, 1)
    enc_img, enc_txt = _encoders()
    ds = CachedDataset(_fill(tmp_path, samples, config, torch.float32, enc_img, enc_txt), config.images, 1)
    want = ds.item(0)[0].clone()  # a copy: the tensors read map the file, which is cut short below
    path = ds.latent_path(0)
    with open(path, "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(DataError, match=rf"cache file {path} cannot be read \(.*\): delete it, and the next start "
                                        "encodes it again"):
        ds.item(0)
    os.remove(path)
    ds = CachedDataset(_fill(tmp_path, samples, config, torch.float32, enc_img, enc_txt), config.images, 1)
    assert torch.equal(ds.item(0)[0], want)


def test_memory_does_not_grow_with_the_data_set(tmp_path):
    """60 captions of a T5-sized embedding (512 x 1024 fp32 = 2 MiB each, 120 MiB in all): building the dataset and
    drawing every item once must not hold them (the old dataset loaded all of them at construction)."""
    n = 60
    captions = [f"a drawing of number {i}" for i in range(n)]
    config = load_data_config(write_dataset(str(tmp_path), n=n, size=16, captions=captions))
    samples, _ = collect_samples(config, 1)
    assert len({s.caption for s in samples}) == n
    enc_img, enc_txt = _encoders(text_shape=(512, 1024))
    caches = _fill(tmp_path, samples, config, torch.float32, enc_img, enc_txt)
    total = sum(map(os.path.getsize, glob.glob(os.path.join(tmp_path, "cache", "**", "text", "**", "*.safetensors"),
                                               recursive=True)))
    assert total > 100 * 2 ** 20
    base = _reset_peak()
    ds = CachedDataset(caches, config.images, 1, ["a validation prompt"])
    for i in range(len(ds)):
        lat, text = ds.item(i)
        assert text["prompt_embeds"].shape == (512, 1024)
        assert torch.isfinite(text["prompt_embeds"]).all()  # touch every value (file-backed pages count once read)
        del lat, text
    grew = _peak_rss_since_reset() - base
    assert grew < 0.15 * total, (grew / 2 ** 20, total / 2 ** 20)  # a few items and the resident prompts at most


def test_probe_memo_reads_each_image_once_across_runs(tmp_path, monkeypatch):
    config = load_data_config(write_dataset(str(tmp_path), n=3))
    calls = []
    real = dataset_mod.probe_image
    monkeypatch.setattr(dataset_mod, "probe_image", lambda p: calls.append(p) or real(p))
    memo_path = str(tmp_path / "out" / "data_digests.json")
    memo = ProbeMemo(memo_path)
    first, _ = collect_samples(config, 1, memo)
    memo.save()
    assert len(calls) == 3
    again, _ = collect_samples(config, 1, ProbeMemo(memo_path))  # a restart: nothing re-read
    assert len(calls) == 3 and [s.digest for s in again] == [s.digest for s in first]
    assert [s.plan for s in again] == [s.plan for s in first]  # sizes remembered too
    changed = first[0].image_path
    with open(changed, "ab") as fh:  # an edited image is probed again
        fh.write(b"\0")
    third, _ = collect_samples(config, 1, ProbeMemo(memo_path))
    assert calls[3:] == [changed] and third[0].digest != first[0].digest
    # a memo written before sizes were kept ([size, mtime, digest]) is read again, not misread
    old = ProbeMemo(memo_path)
    old.known = {k: v[:3] for k, v in old.known.items()}
    assert old.lookup(first[1].image_path) is None and old(first[1].image_path)[0] == first[1].digest


def test_latents_of_an_older_decode_are_not_reused(tmp_path, monkeypatch):
    """The pixels of 16-bit greyscale and transparent images changed on 2026-12-06 (`buckets.to_rgb`): a latent
    encoded from the older pixels must not be found. The decode's version is part of every latent's key."""
    from fewstep.data import cache as cache_mod

    config = load_data_config(write_dataset(str(tmp_path), n=1))
    (sample,), _ = collect_samples(config, 1)
    cache = cache_mod.EmbeddingCache(str(tmp_path / "cache"), "m")
    before = cache._path("latents", cache_mod._digest(sample.digest, sample.plan.tag()))  # the key until then
    now = cache.latent_path(sample)
    assert now != before
    monkeypatch.setattr(cache_mod, "DECODE_VERSION", cache_mod.DECODE_VERSION + 1)
    assert cache.latent_path(sample) not in (now, before)


def test_an_image_replaced_with_the_same_size_and_mtime_is_read_again(tmp_path):
    """`cp -p` / `rsync -t` give a replacement image the old one's modification time; at the same byte size (BMP
    files of one shape always are) the memo handed back the old image's hash, and training used its latents."""
    import hashlib
    import time

    import numpy as np
    from PIL import Image

    config = load_data_config(write_dataset(str(tmp_path), n=1))
    image = tmp_path / "images" / "img0.bmp"
    os.rename(tmp_path / "images" / "img0.png", image)

    def write(seed, path):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)

    write(1, image)
    memo_path = str(tmp_path / "memo.json")
    memo = ProbeMemo(memo_path)
    first, _ = collect_samples(config, 1, memo)
    memo.save()
    old = os.stat(image)
    for how in ("in place", "renamed over"):
        time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
        target = image if how == "in place" else tmp_path / "new.bmp"
        write(2 if how == "in place" else 3, target)
        if how == "renamed over":
            os.replace(target, image)
        os.utime(image, ns=(old.st_atime_ns, old.st_mtime_ns))  # as cp -p / rsync -t leave it
        assert os.stat(image).st_size == old.st_size and os.stat(image).st_mtime_ns == old.st_mtime_ns
        memo = ProbeMemo(memo_path)
        again, _ = collect_samples(config, 1, memo)
        memo.save()
        assert again[0].digest == hashlib.sha256(image.read_bytes()).hexdigest()[:32] != first[0].digest, how


def test_a_corrupt_probe_memo_is_ignored_and_rewritten(tmp_path, capsys):
    """data_digests.json cut short (a full disk, a killed copy) only costs reading the images again: one line says
    so, and the next save writes a whole memo."""
    import json

    config = load_data_config(write_dataset(str(tmp_path), n=2))
    memo_path = tmp_path / "data_digests.json"
    for content in ('{"/x": [1, 2', "[1, 2]", b"\xff\xfe\x00"):
        memo_path.write_bytes(content if isinstance(content, bytes) else content.encode())
        memo = ProbeMemo(str(memo_path))
        assert f"fewstep: ignoring {memo_path}" in capsys.readouterr().out
        samples, _ = collect_samples(config, 1, memo)
        memo.save()
        assert sorted(json.loads(memo_path.read_text())) == sorted(os.path.abspath(s.image_path) for s in samples)


def test_validation_shape_is_the_asked_size_snapped_to_the_models_multiple(tmp_path):
    """validation_resolution (width, height) -> latent [C, H/8, W/8], each side snapped down to the model's multiple
    (16 here: a VAE's 8 times a 2x2 patch), at least one multiple; by default the first entry's square."""
    config = load_data_config(write_dataset(str(tmp_path), n=1))  # resolution 32
    samples, _ = collect_samples(config, 16)
    enc_txt = _encoders()[1]
    caches = _fill(tmp_path, samples, config, torch.float32, lambda px: torch.nn.functional.avg_pool2d(px, 8), enc_txt)
    ds = CachedDataset(caches, config.images, 16)
    assert ds.latents(0).shape == (3, 4, 4)
    assert ds.validation_shape() == (3, 4, 4)
    assert ds.validation_shape((70, 40)) == (3, 4, 8)  # 64 x 32 pixels: [C, height, width]
    assert ds.validation_shape((10, 100)) == (3, 12, 2)  # 16 x 96
