"""Exports are written whole and made durable before anything names them: every file is fsynced before it is
swapped into the export folder (atomically, by rename), the folder's entries after, and an earlier export is replaced,
never truncated in place or deleted before the new one is there. `os.fsync` and `os.replace` are logged, not mocked:
the real calls run."""
import os

import pytest
import torch
from safetensors.torch import load_file

from fewstep import full_export, lora_formats
from fewstep.lora import export_lora
from fewstep.models import get_adapter
from fewstep.models.anystep import ANYSTEP_WEIGHTS_NAME


@pytest.fixture
def audit(monkeypatch):
    """[(kind, path[, destination])] of every fsync and replace, in order; an fsync's path is its descriptor's."""
    events, fsync, replace = [], os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    def logged_replace(src, dst, **kw):
        out = replace(src, dst, **kw)
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return out

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return events


def _synced_then_swapped_in(events, final: str) -> bool:
    """`final` was fsynced under its staging name, then renamed onto `final`, and its folder fsynced after."""
    moves = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final]
    if not moves:
        return False
    i = moves[-1]
    staged = events[i][1]
    return ("fsync", staged) in events[:i] and ("fsync", os.path.dirname(final)) in events[i + 1:]


def _trained_tiny(family="flux"):
    from peft import LoraConfig

    adapter = get_adapter(family)
    t = adapter.load(f"tiny:{family}", with_text=False, with_vae=False).denoiser.eval()
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]))
    adapter.add_anystep(t)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_" in name or "anystep" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapter, t


def test_lora_export_replaces_each_file_whole_and_durably(tmp_path, audit):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"an earlier export")
    (out / lora_formats.COMFYUI_WEIGHTS_NAME).write_bytes(b"an earlier comfyui export")
    adapter, t = _trained_tiny()
    export_lora(adapter, t, str(out), True, ["diffusers"])
    for name in ("pytorch_lora_weights.safetensors", ANYSTEP_WEIGHTS_NAME):
        assert _synced_then_swapped_in(audit, os.path.realpath(out / name)), (name, audit)
    assert load_file(str(out / "pytorch_lora_weights.safetensors"))  # the new file, whole
    assert sorted(os.listdir(out)) == sorted(["pytorch_lora_weights.safetensors", ANYSTEP_WEIGHTS_NAME])  # no staging
    # the ComfyUI file of an earlier export with other options is not left to contradict this one


def test_full_export_is_durable_before_it_replaces_the_earlier_one(tmp_path, audit):
    out = tmp_path / "run" / "transformer"
    out.mkdir(parents=True)
    (out / "diffusion_pytorch_model.safetensors").write_bytes(b"an earlier export")
    _, t = _trained_tiny()
    full_export.export_full(t, str(out), True)
    final = os.path.realpath(out)
    (rename,) = [i for i, e in enumerate(audit) if e[0] == "replace" and e[2] == final]
    staged = audit[rename][1]
    synced = {e[1] for e in audit[:rename] if e[0] == "fsync"}
    files = sorted(os.listdir(out))
    assert files and all(os.path.join(staged, f) in synced for f in files), (files, synced)
    assert staged in synced and ("fsync", os.path.dirname(final)) in audit[rename + 1:]
    assert sorted(os.listdir(out.parent)) == ["transformer"]  # neither the staging folder nor the earlier one left
    assert load_file(str(out / "diffusion_pytorch_model.safetensors"))
