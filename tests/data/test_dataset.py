import json
import os

import pytest
import torch
from PIL import Image

from fewstep.data.cache import CachedDataset
from fewstep.data.dataset import DataError, DataOrder, find_samples, load_backends, load_image
from fewstep_testing import sample_table, write_dataset


def test_pairs_by_stem_and_single_sample_is_valid(tmp_path):
    backend = load_backends(write_dataset(str(tmp_path), n=1))[0]
    samples = find_samples(backend)
    assert len(samples) == 1 and samples[0].caption == "a red circle"


def test_relative_image_dir_resolves_against_config_folder(tmp_path):
    write_dataset(str(tmp_path), n=1)
    cfg = tmp_path / "rel.json"
    cfg.write_text(json.dumps([{"backend": "simple", "resolution": 32, "image_dir": "images"}]))
    assert load_backends(str(cfg))[0].image_dir.endswith("images")


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "orphan.txt").write_text("x"), "caption without an image: .*orphan.txt"),
    (lambda d: Image.new("RGB", (8, 8)).save(d / "lonely.png"), "image without a caption: .*lonely.png"),
])
def test_orphans_are_named(tmp_path, make, message):
    backend = load_backends(write_dataset(str(tmp_path), n=1))[0]
    make(tmp_path / "images")
    with pytest.raises(DataError, match=message):
        find_samples(backend)


def test_unreadable_image_is_named(tmp_path):
    backend = load_backends(write_dataset(str(tmp_path), n=1))[0]
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "images" / "broken.txt").write_text("broken")
    samples = find_samples(backend)
    bad = [s for s in samples if s.image_path.endswith("broken.png")][0]
    with pytest.raises(DataError, match="unreadable image .*broken.png"):
        load_image(bad.image_path, 32, 1)


def test_backend_errors(tmp_path):
    p = tmp_path / "b.json"
    p.write_text(json.dumps([{"backend": "simple", "resolution": 32, "image_dirr": "x"}]))
    with pytest.raises(DataError, match="unknown key 'image_dirr'.*did you mean 'image_dir'"):
        load_backends(str(p))
    p.write_text(json.dumps([{"backend": "simple", "resolution": 32, "image_dir": str(tmp_path / "missing")}]))
    with pytest.raises(DataError, match="does not exist"):
        load_backends(str(p))


def test_resize_and_center_crop(tmp_path):
    img = torch.zeros(3, 20, 40)
    img[:, :, 16:24] = 1.0  # a bright band in the middle: the centre crop must keep it
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "w.png")
    out = load_image(str(tmp_path / "w.png"), 16, 8)
    assert out.shape == (3, 16, 16)
    assert out.min() >= -1 and out.max() <= 1
    assert out[:, :, 6:10].mean() > 0.9 and out[:, :, 0].mean() < 0  # band kept, sides dark
    with pytest.raises(DataError, match="multiple of 8"):
        load_image(str(tmp_path / "w.png"), 20, 8)


def test_data_order_shards_ranks_and_resumes_exactly():
    orders = [DataOrder(7, 2, r, 2, seed=3) for r in range(2)]
    seen = []
    for _ in range(8):  # 8 micro-steps x global batch 4 = 4 epochs of two global batches over 7 samples
        for o in orders:
            seen += o.next_indices()
    for epoch in range(4):  # each epoch a permutation, its last batch completed with the epoch's first sample
        drawn = seen[epoch * 8:(epoch + 1) * 8]
        assert sorted(drawn[:7]) == list(range(7)) and drawn[7] == drawn[0]
        assert len(set(drawn[:4])) == len(set(drawn[4:])) == 4  # no global batch holds a sample twice
    a = DataOrder(7, 2, 1, 2, seed=3)
    ref = [a.next_indices() for _ in range(6)]
    b = DataOrder(7, 2, 1, 2, seed=3)
    [b.next_indices() for _ in range(3)]
    c = DataOrder(7, 2, 1, 2, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_indices() for _ in range(3)] == ref[3:]


def test_cache_computes_once_and_reloads(tmp_path):
    from fewstep.data.backends import load_data_config
    from fewstep.data.cache import CacheSet
    from fewstep.data.dataset import collect_samples

    config = load_data_config(write_dataset(str(tmp_path), n=2))
    samples, _ = collect_samples(config, 1)
    table = sample_table(tmp_path, samples)
    calls = {"img": 0, "txt": 0}

    def enc_img(px):
        calls["img"] += len(px)
        return px[:, :1] * 2.0

    def enc_txt(prompts):
        calls["txt"] += len(prompts)
        return [{"prompt_embeds": torch.full((3, 4), float(len(p)) + 0.5)} for p in prompts]

    def fill(model):
        caches = CacheSet(table, config.images, [""], str(tmp_path / "cache"), model)
        for root in caches.roots():
            caches.cache_at(root).fill(*caches.share(root, 0, 1), enc_img, enc_txt)
        return caches

    fill("model-a")
    caches = fill("model-a")
    assert calls == {"img": 2, "txt": 3}  # second fill found everything cached
    ds = CachedDataset(caches, config.images, 1)
    lat, text = ds.item(0)
    assert torch.equal(lat, load_image(samples[0].image_path, 32, 1)[:1] * 2.0)
    assert text["prompt_embeds"][0, 0].item() == len(samples[0].caption) + 0.5
    assert ds.uncond["prompt_embeds"][0, 0].item() == 0.5
    other = CacheSet(table, config.images, [""], str(tmp_path / "cache"), "model-b")  # another model: its own
    assert len(other.share(other.roots()[0], 0, 1)[0]) == 2


def test_images_that_do_not_decode_are_skipped_at_the_scan_and_counted(tmp_path, capsys):
    """A truncated PNG passes a header read; the scan decodes each image once, so it (and a file that is no image)
    is skipped with a line naming it and counted, instead of stopping the whole job at the cache fill."""
    import os
    from collections import Counter

    from fewstep.data.backends import load_data_config
    from fewstep.data.dataset import collect_samples

    config = load_data_config(write_dataset(str(tmp_path), n=2, size=64))
    cut = tmp_path / "images" / "img1.png"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (tmp_path / "images" / "noise.png").write_bytes(b"not a png")
    (tmp_path / "images" / "noise.txt").write_text("noise")
    samples, skipped = collect_samples(config, 1)
    assert [os.path.basename(s.image_path) for s in samples] == ["img0.png"]
    assert skipped[config.images[0].id] == Counter({"unreadable": 2})
    out = capsys.readouterr().out
    assert "skipping unreadable image" in out and "img1.png" in out and "noise.png" in out
    assert "not an image format Pillow reads" in out and "BytesIO" not in out  # not PIL's in-memory file's name


def test_an_unreadable_image_is_probed_again_at_the_next_start(tmp_path):
    """A read error may be the filesystem's (EIO, a stale handle): the memo does not keep "unreadable", so the image
    is read again at the next start (a readable one is not)."""
    from fewstep.data.backends import load_data_config
    from fewstep.data.dataset import ProbeMemo, collect_samples

    config = load_data_config(write_dataset(str(tmp_path), n=2, size=64))
    img = tmp_path / "images" / "img1.png"
    img.write_bytes(img.read_bytes()[:100])
    memo = ProbeMemo(str(tmp_path / "memo.json"))
    assert len(collect_samples(config, 1, memo)[0]) == 1
    memo.save()
    again = ProbeMemo(str(tmp_path / "memo.json"))
    assert again.lookup(str(img)) is None and again.lookup(str(tmp_path / "images" / "img0.png")) is not None


def test_the_scan_reads_each_image_file_once(tmp_path, monkeypatch):
    """The probe (content hash, full decode, size after EXIF orientation) opens the file once: on a shared filesystem
    each open is a metadata round trip, and a first scan may meet millions of images. A rotated JPEG still gets its
    used size, and the digest is the file's."""
    import builtins
    import hashlib

    from fewstep.data.dataset import probe_image

    img = Image.new("RGB", (40, 60), (200, 30, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated by 90 degrees: used as 60 x 40
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif)
    opened, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    digest, size = probe_image(str(path))
    assert opened == [str(path)]
    assert size == (60, 40) and digest == hashlib.sha256(path.read_bytes()).hexdigest()[:32]


@pytest.mark.parametrize("broken", ["image", "caption file"])
def test_a_broken_symbolic_link_is_named(tmp_path, broken):
    """A folder listing shows a symbolic link whose target is gone; opening it failed with a traceback. Both the
    trainer's scan and a one-process `collect_samples` name the link and its target."""
    import re

    from fewstep.data.backends import load_data_config
    from fewstep.data.dataset import collect_samples
    from fewstep.data.prepare import scan_images

    backend = write_dataset(str(tmp_path), n=1)
    images = tmp_path / "images"
    link = images / ("b.png" if broken == "image" else "b.txt")
    if broken == "image":
        (images / "b.txt").write_text("b")
    else:
        Image.new("RGB", (8, 8)).save(images / "b.png")
    os.symlink(images / "gone", link)
    config = load_data_config(backend)
    message = re.escape(f"{broken} {link} is a broken symbolic link (its target {images / 'gone'} does not exist)")
    with pytest.raises(DataError, match=message):
        collect_samples(config, 1)
    with pytest.raises(DataError, match=message):
        scan_images(config, 1, str(tmp_path / "out" / "data_digests.json"))
