"""Atomic writes (fewstep.data.cache.atomic_save, fewstep.jsonfile.save_json) on a disk that fills up: the write fails
with the disk's error, the target is not created, and no partial temporary file stays (it would hold on to the space
the run needs to go on, on a cache or output disk that is already full). safetensors removes its own; the JSON
writer's stayed before `paths.removed_on_failure`."""
import errno
import os

import pytest
import torch
from safetensors import SafetensorError

from fewstep.data.cache import atomic_save
from fewstep.jsonfile import save_json


def test_a_write_that_fills_the_disk_leaves_nothing(small_disk):
    folder = small_disk / "ab"
    with pytest.raises(SafetensorError, match="No space left on device"):  # safetensors' own error for ENOSPC
        atomic_save({"latents": torch.randn(256 * 1024)}, str(folder / "key.safetensors"))  # 1 MiB on 256 KiB
    with pytest.raises(OSError) as json_error:
        save_json(str(small_disk / "memo.json"), {"x": "y" * (1 << 20)})
    assert json_error.value.errno == errno.ENOSPC
    assert os.listdir(folder) == [] and os.listdir(small_disk) == ["ab"]
    atomic_save({"latents": torch.randn(1024)}, str(folder / "key.safetensors"))  # the space is free again
    assert os.listdir(folder) == ["key.safetensors"]


def test_a_cache_entry_written_first_is_kept(tmp_path, monkeypatch):
    """Two runs sharing a cache may encode the same entry at once, in batches that round differently: the first
    file written stays (a run that read it never finds other bits there), and no temporary file is left. Where the
    filesystem has no hard links, the last writer wins, as a rename does."""
    from safetensors.torch import load_file

    path = str(tmp_path / "ab" / "key.safetensors")
    first, second = torch.randn(8) + 1, torch.randn(8) - 1
    atomic_save({"latents": first}, path, keep_existing=True)
    atomic_save({"latents": second}, path, keep_existing=True)
    assert torch.equal(load_file(path)["latents"], first) and os.listdir(tmp_path / "ab") == ["key.safetensors"]
    atomic_save({"latents": second}, path)  # a plain save replaces
    assert torch.equal(load_file(path)["latents"], second)

    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    atomic_save({"latents": first}, path, keep_existing=True)
    assert torch.equal(load_file(path)["latents"], first) and os.listdir(tmp_path / "ab") == ["key.safetensors"]
