"""Where a model comes from: a local diffusers folder or a hub id, checked before anything loads.

`resolve_folder_or_hub` turns a user's `pretrained_model_name_or_path` into something `from_pretrained` opens
without hanging: an existing pipeline folder as is, a hub id if it is in the Hugging Face cache or the hub answers
within seconds; anything else is one clear error (`ModelSourceError`). `tiny:<family>` is the adapter's business
(`FlowModelAdapter.resolve`).
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from fewstep.errors import ModelFamilyError, ModelSourceError

# a hub id "org/name" (no revision suffix)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
INDEX_FILE = "model_index.json"  # a diffusers pipeline's list of components


def _components(index: dict) -> set[str]:
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}


def _folder_index(folder: str) -> dict | None:
    """A pipeline folder's model_index.json, or None where it has none."""
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index):
        return None
    with open(index) as fh:
        return json.load(fh)


def folder_components(folder: str) -> set[str] | None:
    """The component folders a pipeline folder's model_index.json names (`"vae": ["diffusers", "AutoencoderKL"]`;
    an absent optional component, `[null, null]`, and the `_class_name`-style entries are not folders), or None
    where it has no model_index.json."""
    index = _folder_index(folder)
    return None if index is None else _components(index)


def forces_zeros_for_empty_prompt(folder: str) -> bool:
    """The pipeline folder's `force_zeros_for_empty_prompt` (model_index.json; SDXL's default True: the empty prompt's
    embedding is zeros, not the encoders' output)."""
    return bool((_folder_index(folder) or {}).get("force_zeros_for_empty_prompt", True))


def resolve_folder_or_hub(name: str, denoiser_subfolder: str) -> str:
    """A diffusers pipeline folder (one with model_index.json or a `denoiser_subfolder`/) or a reachable hub id."""
    path = Path(name).expanduser()
    if path.is_file():  # a single-file checkpoint (.safetensors), a config.json, ...
        raise ModelSourceError(f"{name!r} is a file: expected a diffusers pipeline folder (one with model_index.json), "
                               "a hub id like 'org/name', or 'tiny:<family>'")
    if path.is_dir():
        if not (path / denoiser_subfolder).is_dir() and not (path / "model_index.json").exists():
            raise ModelSourceError(f"{name!r} is a directory but not a diffusers pipeline folder: expected "
                                   f"model_index.json or subfolders {denoiser_subfolder}/, vae/, scheduler/, ...")
        return str(path)
    if not HUB_ID.match(name) or name.startswith((".", "~")):
        raise ModelSourceError(f"model directory {name!r} does not exist (expected a local diffusers pipeline "
                               "folder, a hub id like 'org/name', or 'tiny:<family>')")
    return resolve_hub_id(name)


def check_denoiser_class(name: str, src: str, subfolder: str, expected: str, family: str,
                         families: dict[str, str], model_option: str | None = None) -> None:
    """A pipeline folder of another family fails here, naming both, not in `from_pretrained` after the data work.
    `families`: {denoiser class name: family} of every adapter. `model_option`: where the family is a run's, fixed
    (sample.py), the option that names the base model ('--model'), which the fix then names instead of model_family."""
    config = os.path.join(src, subfolder, "config.json")
    if not os.path.isfile(config) and not os.path.isdir(name):
        return  # a hub id's cached snapshot may be partial: its download (engine.loading.local_model) completes it
    owner = f"model_family {family!r}" if model_option is None else f"the run's model family {family!r}"
    if not os.path.isfile(config):
        raise ModelSourceError(f"{name!r} has no {subfolder}/config.json: {owner} loads a {expected} from "
                               f"{subfolder}/")
    try:
        with open(config) as fh:
            found = json.load(fh).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelSourceError(f"{config}: not a readable model config ({type(e).__name__}: {e})") from None
    if found is not None and found != expected:
        if model_option is not None:
            raise ModelFamilyError(f"{name!r} holds a {found} in {subfolder}/, but {owner} samples with a {expected}: "
                                   f"give a {family} model with {model_option}")
        hint = f"set model_family {families[found]!r}" if found in families else "fewstep has no family for it"
        raise ModelFamilyError(f"{name!r} holds a {found} in {subfolder}/, but {owner} trains a {expected}: {hint}, "
                               f"or give a {family} model")


def resolve_hub_id(repo_id: str) -> str:
    """A hub id if it is cached or the hub answers quickly; otherwise a clear, immediate error."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # already downloaded: use the cached snapshot, no network
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    hint = (f"Download it where there is network (`hf download {repo_id} --local-dir DIR`) and pass DIR, "
            "or use 'tiny:<family>' for a tiny test model.")
    if constants.HF_HUB_OFFLINE:
        raise ModelSourceError(f"hub model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                               f"set. {hint}")
    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)
    except urllib.error.HTTPError:
        pass  # the hub answered (404/401/...): from_pretrained reports the precise problem
    except (urllib.error.URLError, OSError) as e:
        raise ModelSourceError(f"no local directory {repo_id!r}, and cannot reach the Hugging Face Hub "
                               f"({constants.ENDPOINT}) to fetch it as a hub model: {getattr(e, 'reason', e)}. "
                               f"{hint}") from None
    return repo_id
