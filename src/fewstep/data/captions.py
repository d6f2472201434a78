"""Finding an entry's images and their captions (SimpleTuner's caption strategies).

- `textfile` (default): `photo.png` + `photo.txt` (`caption_extension`) beside it. Each non-empty line is one
  caption (`disable_multiline_split: true` keeps the file as one caption); a sample draws one line each time it is
  used. An image without a caption file, or a caption file without an image, is an error naming the file.
- `filename`: the file name without extension, underscores as spaces (`a_red_circle.png` -> "a red circle").
- `instanceprompt`: `instance_prompt` for every image.

`prepend_instance_prompt` puts `instance_prompt` and a space before every caption; `only_instance_prompt` replaces
every caption with `instance_prompt`. The folder is searched recursively (hidden folders skipped), in sorted order.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from fewstep.data.backends import ImageEntry
from fewstep.data.errors import DataError, missing_file

def _image_extensions() -> tuple[str, ...]:
    """Every extension of a format PIL opens, as SimpleTuner lists its images (TIFF, GIF, ... besides PNG and JPEG)."""
    from PIL import Image

    return tuple(sorted({ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}))


IMAGE_EXTENSIONS = _image_extensions()
COMMON_EXTENSIONS = ".png,.jpg,.jpeg,.webp"  # named in messages


def walk_files(root: str) -> list[str]:
    """Every file under `root` (recursively, skipping hidden folders and files), as sorted relative paths."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        found += [f if rel == "." else os.path.join(rel, f) for f in files if not f.startswith(".")]
    return sorted(found)


READ_THREADS = 32  # many small reads wait on the filesystem (about 1 ms each on a shared one), not on the CPU


def in_threads(fn, items: list) -> list:
    """[fn(x) for x in items], READ_THREADS at a time: rank 0 reads every caption file and stats every image at each
    start, which one at a time takes minutes at 100k images on a shared filesystem while every other rank waits."""
    if len(items) < 2 * READ_THREADS:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(fn, items))


def _textfile(path: str, multiline: bool) -> list[str]:
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the caption
        with open(path, encoding="utf-8-sig") as fh:  # universal newlines: \r\n and \r read as \n
            text = fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"caption file {path} is not UTF-8 text (byte {e.start}: {e.reason}): save it as UTF-8") \
            from None
    except FileNotFoundError:  # listed, yet not there: a broken symbolic link
        raise missing_file("caption file", path) from None
    if not multiline:
        return [text.strip()]
    # lines end at \n only, as in SimpleTuner: str.splitlines would also cut at U+2028, NEL (U+0085) or a form feed
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return lines or [""]


def _instance(entry: ImageEntry) -> list[str]:
    prompt = entry.instance_prompt
    return [p.strip() for p in prompt] if isinstance(prompt, list) else [prompt.strip()]


def find_captioned_images(entry: ImageEntry) -> list[tuple[str, list[str]]]:
    """(image path, its captions) for every image of the entry, in sorted order."""
    files = walk_files(entry.image_dir)
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    out = []
    if entry.caption_strategy == "textfile" and not entry.only_instance_prompt:
        ext = entry.caption_extension
        stems = {os.path.splitext(f)[0] for f in images}
        for f in files:  # f[:-len(ext)]: without the whole extension (".caption.txt"), not only its last part
            if f.endswith(ext) and f[:-len(ext)] not in stems:
                raise DataError(f"caption without an image: {os.path.join(entry.image_dir, f)} "
                                f"(expected {f[:-len(ext)]}{{{COMMON_EXTENSIONS},...}}: an image PIL opens)")
        present = set(files)
        for f in images:
            cap = os.path.splitext(f)[0] + ext
            if cap not in present:
                raise DataError(f"image without a caption: {os.path.join(entry.image_dir, f)} (expected "
                                f"{os.path.basename(cap)}, or set caption_strategy 'filename' or 'instanceprompt')")
        captions = in_threads(lambda f: _textfile(os.path.join(entry.image_dir, os.path.splitext(f)[0] + ext),
                                                  entry.multiline), images)
        out = list(zip(images, captions))
    elif entry.caption_strategy == "filename" and not entry.only_instance_prompt:
        out = [(f, [os.path.splitext(os.path.basename(f))[0].replace("_", " ")]) for f in images]
    else:  # instanceprompt, or only_instance_prompt with any strategy
        out = [(f, _instance(entry)) for f in images]
    if entry.prepend_instance_prompt and not entry.only_instance_prompt and entry.caption_strategy != \
            "instanceprompt":
        out = [(f, [f"{entry.instance_prompt} {c}" for c in caps]) for f, caps in out]
    if not out:
        what = "image/caption pairs" if entry.caption_strategy == "textfile" else "images"
        raise DataError(f"no {what} in {entry.image_dir}")
    return [(os.path.join(entry.image_dir, f), caps) for f, caps in out]
