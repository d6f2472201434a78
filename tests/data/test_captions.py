"""Caption strategies textfile / filename / instanceprompt, and the instance-prompt switches."""
import os

import pytest

from bucket_testing import write_images
from fewstep.data.backends import ImageEntry
from fewstep.data.captions import find_captioned_images
from fewstep.data.errors import DataError


def captions(folder, **keys):
    entry = ImageEntry(id="e", image_dir=folder, resolution=32.0, **keys)
    return [(os.path.relpath(p, folder), caps) for p, caps in find_captioned_images(entry)]


@pytest.fixture
def folder(tmp_path):
    d = write_images(str(tmp_path / "imgs"), [("red_circle", 16, 16), ("blue_sky", 16, 16)], captions=False)
    with open(os.path.join(d, "red_circle.txt"), "w") as fh:
        fh.write("a red circle\n\n a round red thing \n")
    with open(os.path.join(d, "blue_sky.txt"), "w") as fh:
        fh.write("a blue sky")
    return d


def test_textfile_lines_are_captions(folder):
    assert captions(folder) == [("blue_sky.png", ["a blue sky"]),
                                ("red_circle.png", ["a red circle", "a round red thing"])]
    assert captions(folder, multiline=False)[1] == ("red_circle.png", ["a red circle\n\n a round red thing"])


def test_caption_files_with_a_byte_order_mark_or_not_utf8(folder):
    with open(os.path.join(folder, "blue_sky.txt"), "wb") as fh:
        fh.write("a blue sky".encode("utf-8-sig"))  # as Windows editors save it
    assert captions(folder)[0] == ("blue_sky.png", ["a blue sky"])
    with open(os.path.join(folder, "red_circle.txt"), "wb") as fh:
        fh.write("un cercle rouge, été".encode("latin-1"))
    with pytest.raises(DataError, match=r"caption file .*red_circle.txt is not UTF-8 text \(byte 17"):
        captions(folder)


def test_filename_and_instanceprompt(folder):
    assert captions(folder, caption_strategy="filename") == [("blue_sky.png", ["blue sky"]),
                                                            ("red_circle.png", ["red circle"])]
    assert captions(folder, caption_strategy="instanceprompt", instance_prompt="sks photo") == [
        ("blue_sky.png", ["sks photo"]), ("red_circle.png", ["sks photo"])]
    assert captions(folder, caption_strategy="instanceprompt", instance_prompt=["a", "b"])[0][1] == ["a", "b"]


def test_prepend_and_only_instance_prompt(folder):
    assert captions(folder, instance_prompt="sks", prepend_instance_prompt=True)[1][1] == [
        "sks a red circle", "sks a round red thing"]
    assert captions(folder, caption_strategy="filename", instance_prompt="sks", prepend_instance_prompt=True)[0][1] \
        == ["sks blue sky"]
    assert captions(folder, instance_prompt="sks", only_instance_prompt=True) == [
        ("blue_sky.png", ["sks"]), ("red_circle.png", ["sks"])]


def test_recursive_scan_in_sorted_order_skips_hidden_folders(folder):
    write_images(os.path.join(folder, "sub"), [("deep_one", 16, 16)])
    write_images(os.path.join(folder, ".hidden"), [("ignored", 16, 16)])
    assert [p for p, _ in captions(folder)] == ["blue_sky.png", "red_circle.png", os.path.join("sub", "deep_one.png")]


def test_textfile_orphans_are_errors_but_not_for_other_strategies(folder):
    os.remove(os.path.join(folder, "blue_sky.txt"))
    with pytest.raises(DataError, match="image without a caption: .*blue_sky.png .*caption_strategy 'filename'"):
        captions(folder)
    assert len(captions(folder, caption_strategy="filename")) == 2
    with open(os.path.join(folder, "lonely.txt"), "w") as fh:
        fh.write("x")
    with pytest.raises(DataError, match="caption without an image: .*lonely.txt"):
        captions(folder, caption_strategy="textfile", only_instance_prompt=False)
    empty = os.path.join(os.path.dirname(folder), "empty")
    os.makedirs(empty)
    with pytest.raises(DataError, match="no images in .*empty"):
        captions(empty, caption_strategy="filename")


def test_caption_files_are_read_many_at_a_time_each_with_its_image(tmp_path, monkeypatch):
    """Rank 0 reads every caption file at each start: on a shared filesystem each read waits ~1 ms, so they are read
    concurrently (here: several reads in flight at once); each image keeps its own caption, in sorted order."""
    import threading
    import time

    from fewstep.data import captions
    from fewstep.data.backends import load_data_config
    from fewstep_testing import write_dataset

    write_dataset(str(tmp_path), n=200, size=8, captions=[f"caption {i}" for i in range(200)])
    entry = load_data_config(str(tmp_path / "multidatabackend.json")).images[0]
    real, state, lock = captions._textfile, {"now": 0, "most": 0}, threading.Lock()

    def slow_read(path, multiline):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.002)  # a shared filesystem's latency
        with lock:
            state["now"] -= 1
        return real(path, multiline)

    monkeypatch.setattr(captions, "_textfile", slow_read)
    found = captions.find_captioned_images(entry)
    assert state["most"] > 1
    assert len(found) == 200 and [p for p, _ in found] == sorted(p for p, _ in found)
    assert all(caps == [f"caption {int(os.path.basename(p)[3:-4])}"] for p, caps in found)  # img<i>.png


def test_lines_end_at_newline_only_as_in_simpletuner(tmp_path):
    """A caption line ends at "\\n" (SimpleTuner's split); str.splitlines also cut at U+2028, NEL and form feed, which
    can sit inside a caption. Windows (CRLF) and old Mac (CR) line ends still end lines, leaving no "\\r"."""
    texts = {"crlf": b"a cat\r\n\r\na dog\r\n", "cr": b"a cat\ra dog\r", "ls": "a man\u2028wearing a hat".encode(),
             "nel": "caf\u00e9 sign\u0085 in paris".encode(), "ff": b"one caption\x0cwith a form feed"}
    d = write_images(str(tmp_path / "imgs"), [(stem, 8, 8) for stem in texts], captions=False)
    for stem, data in texts.items():
        with open(os.path.join(d, stem + ".txt"), "wb") as fh:
            fh.write(data)
    got = dict(captions(d))
    assert got["crlf.png"] == got["cr.png"] == ["a cat", "a dog"]
    for stem in ("ls", "nel", "ff"):
        assert got[f"{stem}.png"] == [texts[stem].decode()], stem


def test_a_caption_extension_with_two_dots(tmp_path):
    """`caption_extension: ".caption.txt"`: photo.png's caption is photo.caption.txt (the orphan check took
    "photo.caption" for its image's name and refused every such file)."""
    d = write_images(str(tmp_path / "imgs"), [("photo", 8, 8), ("shot.v2", 8, 8)], captions=False)
    for stem in ("photo", "shot.v2"):
        with open(os.path.join(d, stem + ".caption.txt"), "w") as fh:
            fh.write(f"caption of {stem}")
    assert captions(d, caption_extension=".caption.txt") == [("photo.png", ["caption of photo"]),
                                                             ("shot.v2.png", ["caption of shot.v2"])]
    with open(os.path.join(d, "lost.caption.txt"), "w") as fh:
        fh.write("x")
    with pytest.raises(DataError, match=r"caption without an image: .*lost.caption.txt \(expected lost\{.png"):
        captions(d, caption_extension=".caption.txt")


def test_every_format_pil_opens_is_an_image(tmp_path):
    """As SimpleTuner lists images: any extension of a format PIL opens (TIFF and GIF were skipped without a word
    under `filename`, and their caption files refused as captions without an image under `textfile`)."""
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("a_red.png", "b_blue.tiff", "c_green.gif"):
        Image.new("RGB", (8, 8), name.split("_")[1].split(".")[0]).save(d / name)
    (d / "notes.md").write_text("not an image")
    assert captions(str(d), caption_strategy="filename") == [("a_red.png", ["a red"]), ("b_blue.tiff", ["b blue"]),
                                                             ("c_green.gif", ["c green"])]
