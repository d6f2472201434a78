"""SimpleTuner's multidatabackend.json, read as users write it: image entries, text_embeds and image_embeds entries.

Every key either does what SimpleTuner's DATALOADER.md documents, or stops the run with a `DataError` naming the
file, the entry and the key and saying what fewstep does instead (the key lists: `fewstep.data.backend_keys`). Keys
that cannot change the training data in SimpleTuner either (write batch sizes, `hash_filenames`, `ignore_epochs`) are
accepted; SimpleTuner's placeholders (`{model_family}`, ...) are filled (`fewstep.data.placeholders`).

fewstep's own spelling still works: `{"backend": "simple", "resolution": 1024, "image_dir": "data",
"caption_extension": ".txt", "shuffle": true}`. An entry without a `crop` key is cropped as fewstep always did (a
centre square of the image resized to cover `resolution`); SimpleTuner's default would be `crop: false`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from fewstep import paths
from fewstep.data.backend_keys import IMAGE_EMBED_KEYS, IMAGE_KEYS, TEXT_KEYS, check_keys, refuse_features
from fewstep.data.errors import DataError
from fewstep.data.placeholders import fill_placeholders
from fewstep.jsonfile import load_json

_STORAGE_TYPES = {"aws": "S3", "csv": "a CSV URL list", "huggingface": "the Hugging Face hub",
                  "webshart": "Webshart shards", "memory": "a RAM copy of the cache"}
_CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt")
_CROP_STYLES = {"center": "center", "centre": "center", "corner": "corner", "random": "random"}
_CROP_ASPECTS = ("square", "preserve", "closest", "random")
RESOLUTION_TYPES = ("pixel", "area", "pixel_area")


@dataclass
class ImageEntry:
    """One image entry with SimpleTuner's defaults resolved (see `load_data_config`)."""
    id: str
    image_dir: str
    resolution: float                    # pixels (pixel, pixel_area) or megapixels (area)
    resolution_type: str = "pixel"
    crop: bool = True
    crop_explicit: bool = False          # the entry set `crop` (SimpleTuner's crop rules); else fewstep's default
    type_explicit: bool = False          # the entry (or the config) set `resolution_type`; else fewstep's default
    crop_style: str = "center"
    crop_aspect: str = "square"
    crop_aspect_buckets: list = field(default_factory=list)  # floats, or {"aspect": a, "weight": w}
    max_upscale_threshold: Optional[float] = None
    minimum_image_size: Optional[float] = None
    maximum_image_size: Optional[float] = None
    target_downsample_size: Optional[float] = None
    minimum_aspect_ratio: Optional[float] = None
    maximum_aspect_ratio: Optional[float] = None
    caption_strategy: str = "textfile"
    strategy_explicit: bool = False      # the entry (or the config) set `caption_strategy`; else fewstep's default
    caption_extension: str = ".txt"
    instance_prompt: Optional[str | list] = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    multiline: bool = True               # textfile: each line is a caption (disable_multiline_split: false)
    repeats: int = 0                     # extra passes per epoch (SimpleTuner: 0 = each image once)
    probability: float = 1.0             # relative weight when a batch picks its entry
    shuffle: bool = True
    vae_cache_dir: Optional[str] = None  # where this entry's latents go (cache_dir_vae / its image_embeds entry)
    text_cache_dir: Optional[str] = None  # where its caption embeddings go (its text_embeds entry)
    where: str = ""                      # "<file> entry <i> ('<id>')" for messages
    inherited: tuple = ()                # the keys of `ENTRY_DEFAULTS` it took from the config
    config_resolution: Optional[float] = None  # the config's `resolution`, where it has one

    @property
    def shown_resolution(self) -> str:
        """Its resolution and where it comes from, in words (logged at start)."""
        unit = "MP" if self.resolution_type == "area" else "px"
        text = f"resolution {self.resolution:g} {unit} ({self.resolution_type}"
        if "resolution" in self.inherited:
            text += ", the config's"
        elif self.config_resolution is not None and self.config_resolution != self.resolution:
            text += f", its own: the config's {self.config_resolution:g} is for entries that set none"
        downsampled = self.crop and self.maximum_image_size and self.target_downsample_size  # sizes in its units
        if not self.type_explicit and not (self.crop and self.crop_aspect == "square" and not downsampled):
            text += "; fewstep's default resolution_type, SimpleTuner's is pixel_area"  # (a plain square: the same)
        return text + ")"

    @property
    def shown_crop(self) -> str:
        """How this entry's images are cut, in words (logged at start)."""
        if not self.crop:
            return "aspect buckets (crop: false)"
        aspect = {"square": "square", "preserve": "aspect buckets", "closest": "closest crop_aspect_bucket",
                  "random": "random crop_aspect_bucket"}[self.crop_aspect]
        default = not self.crop_explicit and self.crop_aspect == "square"
        note = " (fewstep's default; SimpleTuner's is crop: false)" if default else ""
        return f"{self.crop_style} crop, {aspect}{note}"


@dataclass
class DataConfig:
    """Everything a multidatabackend.json says: image entries and the default text-embedding cache."""
    path: str
    images: list[ImageEntry]
    default_text_cache_dir: Optional[str] = None
    text_batch_sizes: dict = field(default_factory=dict)  # text cache dir -> text_encoder_batch_size


def resolution_fits(resolution, res_type: str) -> bool:
    """Whether `resolution` is one in the units of `res_type`: megapixels in (0, 64] for area, else pixels >= 8 (a
    whole number for pixel). An entry's and the config's alike."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)) or not math.isfinite(resolution):
        return False
    if res_type == "area":
        return 0 < resolution <= 64
    return resolution >= 8 and (res_type != "pixel" or resolution == int(resolution))


def config_given(inherited: tuple, keys: tuple) -> str:
    """A message's note of which of `keys` an entry took from the config (`ENTRY_DEFAULTS`), or ""."""
    told = [k for k in keys if k in inherited]
    return f" (the config's {' and '.join(told)}: this entry sets none)" if told else ""


def _got(value) -> str:
    """A refused value as an error names it: a number written as a string says so ('32' reads like a number)."""
    return f"the string {value!r}" if isinstance(value, str) else repr(value)


def _number(entry: dict, key: str, where: str, lo: float = 0.0, integer: bool = False, default=None):
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise DataError(f"{where}: '{key}' must be {'an integer' if integer else 'a number'}, got {_got(value)}")
    if not math.isfinite(value):  # JSON's NaN and Infinity parse too
        raise DataError(f"{where}: '{key}' must be a finite number, got {value!r}")
    if value < lo:
        raise DataError(f"{where}: '{key}' must be >= {lo}, got {value!r}")
    return value


def _flag(entry: dict, key: str, where: str, default: bool) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise DataError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _choice(entry: dict, key: str, where: str, choices, default: str) -> str:
    value = entry.get(key, default)
    if value not in choices:
        raise DataError(f"{where}: '{key}' must be one of {', '.join(choices)}; got {value!r}")
    return value


def _local_dir(value, key: str, where: str, config_path: str, must_exist: bool) -> Optional[str]:
    """A folder from the file: ~ and $VARS expanded on this rank; relative paths against the working directory,
    then (for an existing data folder) the file's own folder."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a path, got {value!r}")
    path = paths.expand(value)
    problem = paths.unexpanded(path)
    if problem:
        raise DataError(f"{where}: {key} {value!r}: {problem}")
    if must_exist and not os.path.isabs(path) and not os.path.isdir(path):
        alt = os.path.join(os.path.dirname(os.path.abspath(config_path)), path)
        path = alt if os.path.isdir(alt) else path
    if must_exist and not os.path.isdir(path):
        raise DataError(f"{where}: {key} '{path}' does not exist")
    return os.path.abspath(path)


def _folder_problem(path: str) -> Optional[str]:
    """Why the (cache) folder `path` cannot be made, checked without making it: a file in its place or above it, or
    a missing folder under one this process cannot write. An existing folder is fine, writable or not (a finished
    cache is read in place)."""
    there = path
    while not os.path.exists(there) and os.path.dirname(there) != there:
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        return f"'{there}' is a file, not a folder" if there != path else "it is a file, not a folder"
    if there != path and not os.access(there, os.W_OK | os.X_OK):
        return f"it does not exist, and '{there}' is not writable to create it in"
    return None


def _kind(entry: dict, where: str) -> str:
    dataset_type = entry.get("dataset_type", "image")
    if dataset_type not in ("image", "text_embeds", "image_embeds"):
        raise DataError(f"{where}: dataset_type '{dataset_type}' is not supported: fewstep trains text-to-image "
                        "models on 'image' entries, with 'text_embeds' / 'image_embeds' entries naming cache folders")
    refuse_features(entry, where)
    storage = entry.get("type", entry.get("backend", "local"))
    if storage in _STORAGE_TYPES:
        raise DataError(f"{where}: type '{storage}' ({_STORAGE_TYPES[storage]}) is not supported: fewstep reads "
                        "images and writes its caches on local or shared folders; use type 'local' with "
                        "instance_data_dir (images) or cache_dir (text_embeds / image_embeds)")
    if storage not in ("local", "simple"):
        raise DataError(f"{where}: type '{storage}' is not supported (use 'local')")
    return dataset_type


ENTRY_DEFAULTS = ("resolution", "resolution_type", "minimum_image_size", "maximum_image_size", "target_downsample_size",
                  "caption_strategy")  # config options, as SimpleTuner's global ones


def entry_defaults(cfg) -> dict:
    """The config's values (a fewstep Config) of `ENTRY_DEFAULTS` that it sets: SimpleTuner's global defaults of
    image entries that do not set their own."""
    return {k: getattr(cfg, k) for k in ENTRY_DEFAULTS if getattr(cfg, k) is not None}


def load_data_config(path: str, config_defaults: Optional[dict] = None, images_must_exist: bool = True,
                     variables: Optional[dict] = None) -> DataConfig:
    """Parse a multidatabackend.json (a list of entries, or one entry). `config_defaults` (`entry_defaults`: the
    config's `resolution`, `resolution_type`, `minimum_image_size`, ...) apply to the image entries that do not set
    them, as SimpleTuner's global options do; `variables` (`placeholders`) fill SimpleTuner's `{model_family}` and
    `{output_dir}` (`fill_placeholders`). `images_must_exist` False: image folders are not looked for (the memory
    planner reads sizes, not images)."""
    entries = load_json(path, DataError, "data_backend_config")
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{path}: expected a list of backend entries (JSON objects)")
    live, ids = [], set()
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}" + (f" ('{entry['id']}')" if "id" in entry else "")
        entry = fill_placeholders(entry, {**(variables or {}), "id": entry.get("id", "")}, where)
        if any(_flag(entry, k, where, False) for k in ("disabled", "disable")):
            continue  # SimpleTuner skips a disabled entry entirely
        key = str(entry.get("id", f"entry{i}"))
        if key in ids:
            raise DataError(f"{where}: id '{key}' is used by two entries")
        ids.add(key)
        live.append((i, key, where, entry, _kind(entry, where)))
    text = {k: (e, w) for _, k, w, e, kind in live if kind == "text_embeds"}
    image_embeds = {k: (e, w) for _, k, w, e, kind in live if kind == "image_embeds"}
    config = DataConfig(path, [])
    for key, (entry, where) in text.items():
        check_keys(entry, TEXT_KEYS, where)
        _number(entry, "write_batch_size", where, lo=1, integer=True)  # accepted: each file is written as encoded
        size = _number(entry, "text_encoder_batch_size", where, lo=1, integer=True)
        if size:
            config.text_batch_sizes[_local_dir(entry.get("cache_dir"), "cache_dir", where, path, False)] = size
    for key, (entry, where) in image_embeds.items():
        check_keys(entry, IMAGE_EMBED_KEYS, where)
    defaults = [k for k, (e, w) in text.items() if _flag(e, "default", w, False)]
    if len(defaults) > 1:
        raise DataError(f"{path}: more than one text_embeds entry has default: true ({', '.join(defaults)})")
    # none marked: the first enabled one, as SimpleTuner's factory picks it (it holds the empty-prompt and validation
    # prompt embeddings)
    default = defaults[0] if defaults else (next(iter(text)) if text else None)
    if default is not None:
        entry, where = text[default]
        config.default_text_cache_dir = _local_dir(entry.get("cache_dir"), "cache_dir", where, path, False)
    for i, key, where, entry, kind in live:
        if kind == "image":
            given = config_defaults or {}
            inherited = tuple(k for k in given if k not in entry)
            image = _image_entry({**given, **entry}, key, where, path, text, image_embeds, default, images_must_exist,
                                 inherited)
            image.config_resolution = given.get("resolution")
            config.images.append(image)
    if not config.images:
        raise DataError(f"{path}: no enabled image entries")
    if images_must_exist:  # not for the planner, which may read the file where the training nodes' folders are not
        for _, _, where, entry, kind in live:
            key = "cache_dir_vae" if kind == "image" else "cache_dir"
            folder = _local_dir(entry.get(key), key, where, path, False)
            problem = _folder_problem(folder) if folder else None
            if problem:
                raise DataError(f"{where}: {key} '{folder}': {problem}")
    return config


def _image_entry(entry: dict, key: str, where: str, path: str, text: dict, image_embeds: dict,
                 default_text, must_exist: bool = True, inherited: tuple = ()) -> ImageEntry:
    check_keys(entry, IMAGE_KEYS, where)
    image_dir = entry.get("instance_data_dir", entry.get("image_dir"))
    if image_dir in (None, ""):
        raise DataError(f"{where}: needs 'instance_data_dir' (or 'image_dir'): the folder of images")
    image_dir = _local_dir(image_dir, "instance_data_dir" if "instance_data_dir" in entry else "image_dir", where,
                           path, must_exist)
    res_type = _choice(entry, "resolution_type", where, RESOLUTION_TYPES, "pixel")
    resolution = entry.get("resolution")
    from_config = config_given(inherited, ("resolution", "resolution_type"))
    if resolution is None:
        raise DataError(f"{where}: needs 'resolution' (or set 'resolution' in the config, for every entry that sets "
                        "none)")
    if res_type == "area" and not resolution_fits(resolution, res_type):
        raise DataError(f"{where}: with resolution_type 'area', 'resolution' is in megapixels (e.g. 1.0), "
                        f"got {_got(resolution)}{from_config}")
    if not resolution_fits(resolution, res_type):
        raise DataError(f"{where}: 'resolution' must be an integer >= 8 pixels, got {_got(resolution)}{from_config}")
    crop_explicit = "crop" in entry
    crop = _flag(entry, "crop", where, True)
    crop_aspect = _choice(entry, "crop_aspect", where, _CROP_ASPECTS, "square")
    style = entry.get("crop_style", "random" if crop_explicit else "center")
    if style == "face":
        raise DataError(f"{where}: crop_style 'face' is not supported (fewstep ships no face detector); use "
                        "'center', 'random' or 'corner'")
    if not isinstance(style, str) or style not in _CROP_STYLES:
        raise DataError(f"{where}: 'crop_style' must be one of {', '.join(_CROP_STYLES)}; got {style!r}")
    style = _CROP_STYLES[style]
    buckets = entry.get("crop_aspect_buckets") or []
    if crop and crop_aspect in ("closest", "random"):
        _check_aspect_buckets(buckets, crop_aspect, where)
    nums = {k: _number(entry, k, where) for k in ("minimum_image_size", "maximum_image_size",
                                                    "target_downsample_size", "max_upscale_threshold")}
    aspects = {k: _number(entry, k, where) for k in ("minimum_aspect_ratio", "maximum_aspect_ratio")}
    if nums["maximum_image_size"] and not nums["target_downsample_size"]:
        raise DataError(f"{where}: 'maximum_image_size' needs 'target_downsample_size' too (the size an image "
                        "larger than maximum_image_size is resized to before the crop)")
    strategy = entry.get("caption_strategy", "textfile")
    if strategy not in _CAPTION_STRATEGIES:
        raise DataError(f"{where}: caption_strategy '{strategy}' is not supported; use one of "
                        f"{', '.join(_CAPTION_STRATEGIES)}")
    instance = entry.get("instance_prompt")
    if instance is not None and not (isinstance(instance, str) or (
            isinstance(instance, list) and instance and all(isinstance(p, str) for p in instance))):
        raise DataError(f"{where}: 'instance_prompt' must be a string (or a list of strings), got {instance!r}")
    prepend, only = (_flag(entry, k, where, False) for k in ("prepend_instance_prompt", "only_instance_prompt"))
    if (strategy == "instanceprompt" or prepend or only) and not instance:
        need = "caption_strategy 'instanceprompt'" if strategy == "instanceprompt" else \
            ("prepend_instance_prompt" if prepend else "only_instance_prompt")
        raise DataError(f"{where}: {need} needs a non-empty 'instance_prompt'")
    if prepend and isinstance(instance, list):
        raise DataError(f"{where}: prepend_instance_prompt needs a single 'instance_prompt' string")
    ext = entry.get("caption_extension", ".txt")
    if strategy != "textfile" and not isinstance(ext, str):
        ext = ".txt"  # not used
    if not isinstance(ext, str) or not ext.strip("."):
        raise DataError(f"{where}: 'caption_extension' must be a file extension such as \".txt\", got {ext!r}")
    probability = _number(entry, "probability", where, default=1.0)
    if not probability:
        raise DataError(f"{where}: 'probability' must be > 0 (with 0 SimpleTuner never draws the entry, but still "
                        "scans and caches it); to leave an entry out, set 'disabled': true")
    return ImageEntry(
        id=key, image_dir=image_dir, resolution=float(resolution), resolution_type=res_type, crop=crop,
        crop_explicit=crop_explicit, type_explicit="resolution_type" in entry, inherited=inherited,
        crop_style=style if crop else "center", crop_aspect=crop_aspect if crop else "preserve",
        crop_aspect_buckets=list(buckets), **nums, **aspects, caption_strategy=strategy,
        strategy_explicit="caption_strategy" in entry,
        caption_extension=ext if ext.startswith(".") else "." + ext, instance_prompt=instance,
        prepend_instance_prompt=prepend, only_instance_prompt=only,
        multiline=not _flag(entry, "disable_multiline_split", where, False),
        repeats=_number(entry, "repeats", where, integer=True, default=0) or 0, probability=float(probability),
        shuffle=_flag(entry, "shuffle", where, True),
        vae_cache_dir=_vae_dir(entry, where, path, image_embeds),
        text_cache_dir=_text_dir(entry, where, path, text, default_text), where=where)


def _check_aspect_buckets(buckets, crop_aspect: str, where: str) -> None:
    if not isinstance(buckets, list) or not buckets:
        raise DataError(f"{where}: crop_aspect '{crop_aspect}' needs 'crop_aspect_buckets', a list of aspect "
                        "ratios (width / height) such as [0.75, 1.0, 1.5]")
    dicts = [isinstance(b, dict) for b in buckets]
    for b in buckets:
        a = b.get("aspect") if isinstance(b, dict) else b
        if isinstance(a, bool) or not isinstance(a, (int, float)) or a <= 0 or (
                isinstance(b, dict) and not isinstance(b.get("weight"), (int, float))):
            raise DataError(f"{where}: crop_aspect_buckets entries must be positive numbers or "
                            f"{{\"aspect\": a, \"weight\": w}} objects, got {b!r}")
    if any(dicts) and not all(dicts):
        raise DataError(f"{where}: crop_aspect_buckets mixes numbers and objects")
    negative = [b for b in buckets if isinstance(b, dict) and not b["weight"] >= 0]  # (NaN is not >= 0 either)
    if negative:
        raise DataError(f"{where}: the weights of crop_aspect_buckets must be >= 0, got {negative[0]!r}")
    if all(dicts) and abs(sum(b["weight"] for b in buckets) - 1.0) > 1e-6:
        raise DataError(f"{where}: the weights of crop_aspect_buckets must add up to 1")


def _vae_dir(entry: dict, where: str, path: str, image_embeds: dict) -> Optional[str]:
    """cache_dir_vae, else the cache_dir of the image_embeds entry it names, else None (the run's cache_dir)."""
    if entry.get("cache_dir_vae"):
        return _local_dir(entry["cache_dir_vae"], "cache_dir_vae", where, path, False)
    return _linked_dir(entry.get("image_embeds"), image_embeds, "image_embeds", where, path)


def _text_dir(entry: dict, where: str, path: str, text: dict, default) -> Optional[str]:
    """The cache_dir of the text_embeds entry it names (or of the default one), else None (the run's cache_dir)."""
    return _linked_dir(entry.get("text_embeds", default), text, "text_embeds", where, path)


def _linked_dir(link, linked: dict, kind: str, where: str, path: str) -> Optional[str]:
    """The cache_dir of the enabled `kind` entry that `link` names; None without a link."""
    if link is None:
        return None
    if link not in linked:
        raise DataError(f"{where}: {kind} '{link}' names no enabled {kind} entry")
    target, target_where = linked[link]
    return _local_dir(target.get("cache_dir"), "cache_dir", target_where, path, False)
