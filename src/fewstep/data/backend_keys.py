"""Which keys a multidatabackend.json entry may hold, per dataset_type, and the SimpleTuner keys fewstep refuses.

A SimpleTuner key that would change the training data is refused (`REFUSED`: unless set to the value that leaves
the data as it is) with what fewstep does instead; `check_keys` also names a key that belongs to another
dataset_type or to an unsupported storage type, and suggests the nearest key for a misspelt one.
"""
from __future__ import annotations

import difflib
from typing import Any

from fewstep.data.errors import DataError

_COMMON = {"id", "dataset_type", "type", "backend", "disabled", "disable"}
IMAGE_KEYS = _COMMON | {
    "instance_data_dir", "image_dir", "resolution", "resolution_type", "crop", "crop_style", "crop_aspect",
    "crop_aspect_buckets", "max_upscale_threshold", "minimum_image_size", "maximum_image_size",
    "target_downsample_size", "minimum_aspect_ratio", "maximum_aspect_ratio", "caption_strategy",
    "caption_extension", "instance_prompt", "prepend_instance_prompt", "only_instance_prompt",
    "disable_multiline_split", "repeats", "probability", "shuffle", "cache_dir_vae", "text_embeds", "image_embeds",
    "hash_filenames", "ignore_epochs"}  # the last two change nothing in SimpleTuner either (ignore_epochs: deprecated)
# SimpleTuner keys that change nothing fewstep trains on, accepted at any value: start-up speed-ups of its own file
# lists and caches (fewstep scans the folder and encodes everything before training at every start), the web UI's
# per-entry validation switch (fewstep's validation draws no images from the data), metadata refresh intervals
NO_EFFECT_IMAGE_KEYS = {"skip_file_discovery", "preserve_data_backend_cache", "vae_cache_ondemand",
                        "text_cache_ondemand", "disable_validation", "metadata_update_interval"}
IMAGE_KEYS |= NO_EFFECT_IMAGE_KEYS
TEXT_KEYS = _COMMON | {"default", "cache_dir", "write_batch_size", "text_encoder_batch_size"}
IMAGE_EMBED_KEYS = _COMMON | {"cache_dir"}

_NO_PRECACHE = ("fewstep encodes every image and caption before training, so that training loads only the "
                "transformer; remove the key")
_CONDITIONING = "conditioning data (ControlNet, masks, edit references) is not supported: fewstep distils " \
                "text-to-image models from image/caption pairs"
_SCHEDULE = "dataset scheduling is not supported: every enabled entry is sampled from the first step to the " \
            "last; weight entries with 'probability' or disable one with 'disabled: true'"
_falsy = lambda v: not v  # noqa: E731
_never = lambda v: False  # noqa: E731
_at_most_one = lambda v: v is None or (isinstance(v, (int, float)) and v <= 1)  # noqa: E731
# SimpleTuner keys fewstep refuses, unless set to the value that leaves the data as it is: key -> (accepted?, why)
REFUSED: dict[str, tuple[Any, str]] = {
    "vae_cache_clear_each_epoch": (_falsy, "fewstep encodes each image once, before training (training loads only "
                                   "the transformer), so crops are not re-drawn every epoch; set it to false"),
    "vae_cache_disable": (_falsy, _NO_PRECACHE), "text_cache_disable": (_falsy, _NO_PRECACHE),
    "metadata_backend": (lambda v: v in (None, "discovery"),
                         "fewstep reads each image's size from the file itself ('discovery'); remove the key"),
    "delete_unwanted_images": (_falsy, "fewstep never deletes your files: images outside the size or aspect limits "
                               "are skipped and counted in the log"),
    "delete_problematic_images": (_falsy, "fewstep never deletes your files: an image that does not decode is "
                                  "skipped and counted in the start-up line"),
    "delete_nsfw_images": (_falsy, "fewstep never deletes your files, and runs no NSFW classifier"),
    "train_batch_size": (lambda v: False, "a per-entry batch size is not supported: every batch holds train_batch_size "
                         "images of the config; remove the key"),
    "max_num_samples": (lambda v: v is None, "not supported: put the subset you want in its own folder"),
    "start_epoch": (_at_most_one, _SCHEDULE), "start_step": (_at_most_one, _SCHEDULE),
    "end_epoch": (lambda v: v is None, _SCHEDULE), "end_step": (lambda v: v is None, _SCHEDULE),
    "timestep_sampling_offset": (_falsy, "per-entry timestep offsets are not supported; timestep sampling is "
                                 "set for the whole run in the config (flow_logit_mean, flow_schedule_shift, ...)"),
    "is_regularisation_data": (_falsy, "regularisation (parent-teacher) data is not supported"),
    "is_regularization_data": (_falsy, "regularisation (parent-teacher) data is not supported"),
    "caption_shuffle": (lambda v: not v or (isinstance(v, dict) and not v.get("enable")),
                        "not supported: write the variants as separate "
                        "lines of the caption file (each line is a caption; one is drawn per sample)"),
    "caption_filter_list": (_falsy, "not supported: edit the captions (fewstep trains on them as written)"),
    "conditioning": (_never, _CONDITIONING), "conditioning_data": (_never, _CONDITIONING),
    "conditioning_type": (_never, _CONDITIONING), "source_dataset_id": (_never, _CONDITIONING),
    "conditioning_image_embeds": (_never, _CONDITIONING),
    "cache_dir_conditioning_image_embeds": (_never, _CONDITIONING),
    "parquet": (_never, "parquet metadata is not supported: use caption_strategy textfile, filename or "
                "instanceprompt"),
    "video": (_never, "fewstep trains image models; video datasets are not supported"),
    "audio": (_never, "fewstep trains image models; audio datasets are not supported"),
    "slider_strength": (_never, "slider LoRA training is not supported"),
    "grounding": (_never, "grounding (spatial annotations) is not supported"),
}
FEATURES = {k for k, (ok, _) in REFUSED.items() if ok is _never}  # refused at any value: said before anything else
HUB_DATASET_KEYS = {"dataset_name", "split", "revision", "image_column", "caption_column"}  # type huggingface


def refuse_features(entry: dict, where: str) -> None:
    """A DataError for a key of a feature fewstep does not have (`FEATURES`: conditioning, video, ...): the first
    thing said of an entry, before its storage type (moving a ControlNet data set to local folders would not help)."""
    for key in entry:
        if key in FEATURES:
            raise DataError(f"{where}: '{key}': {REFUSED[key][1]}")


def check_keys(entry: dict, allowed: set, where: str) -> None:
    """A DataError for the first key of `entry` not in `allowed` (a `REFUSED` key passes at its harmless value)."""
    kinds = {"image": IMAGE_KEYS, "text_embeds": TEXT_KEYS, "image_embeds": IMAGE_EMBED_KEYS}
    for key in entry:
        if key in allowed:
            continue
        elsewhere = [k for k, keys in kinds.items() if key in keys]
        if elsewhere:
            raise DataError(f"{where}: '{key}' applies to dataset_type {' / '.join(elsewhere)} entries, not to "
                            f"this {entry.get('dataset_type', 'image')} entry")
        if key in REFUSED:
            ok, why = REFUSED[key]
            if ok(entry[key]):
                continue
            raise DataError(f"{where}: '{key}': {why}")
        if key.startswith(("aws_", "csv_", "huggingface", "memory_filesystem")) or key in HUB_DATASET_KEYS:
            raise DataError(f"{where}: '{key}' belongs to a storage type fewstep does not support; it reads local "
                            "(or shared) folders: use type 'local' with instance_data_dir / cache_dir")
        hint = difflib.get_close_matches(key, sorted(allowed | set(REFUSED)), n=1)
        raise DataError(f"{where}: unknown key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))
