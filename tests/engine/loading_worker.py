"""2 ranks: ZeRO-3 partitioned loading of sharded safetensors and block-by-block sharded export, for tiny Flux and
Qwen-Image transformers, in fp32 and bf16. Prints "loading ok: ..." per case.

Usage: torchrun --nproc_per_node 2 loading_worker.py TMPDIR
"""
import os
import sys

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from fewstep import full_export
from fewstep.config import load_config
from fewstep.engine.deepspeed_engine import build_ds_config
from fewstep.engine.distributed import setup_distributed, teardown, wait_for_all
from fewstep.engine.loading import INDEX_NAME, load_transformer
from fewstep.models import get_adapter
from fewstep.models.tiny import build_tiny_pipeline

tmp = sys.argv[1]
info = setup_distributed()
# As on a CPU without AVX512-FP16 (AMD EPYC, older Intel), where DeepSpeed's zero.Init ignored the dtype it was given
get_accelerator().is_fp16_supported = lambda: False
full_export.SHARD_BYTES = 20_000  # many shards even for a tiny model
for family in ("flux", "qwen_image"):
    adapter = get_adapter(family)
    src = os.path.join(tmp, family)
    if info.is_main:  # a sharded checkpoint, as large models ship
        build_tiny_pipeline(family).transformer.save_pretrained(os.path.join(src, "transformer"),
                                                                max_shard_size="30KB")
    wait_for_all("saved")
    assert os.path.exists(os.path.join(src, "transformer", INDEX_NAME))
    for dtype in (torch.float32, torch.bfloat16):
        cfg = load_config(None, {"model_family": family, "pretrained_model_name_or_path": src, "zero_stage": 3,
                                 "mixed_precision": "bf16" if dtype == torch.bfloat16 else "fp32"})
        ref = adapter.denoiser_cls.from_pretrained(src, subfolder="transformer", torch_dtype=dtype)
        model = load_transformer(adapter, src, dtype, build_ds_config(cfg), info.device)
        params = dict(model.named_parameters())
        assert all(hasattr(p, "ds_tensor") and p.dtype == p.ds_tensor.dtype == dtype for p in params.values()), dtype
        assert sum(p.ds_tensor.numel() for p in params.values()) < sum(p.numel() for p in ref.parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name, p in ref.named_parameters():
                assert torch.equal(params[name].data, p.data), (family, dtype, name)
        out = os.path.join(tmp, f"export-{family}-{dtype}".replace("torch.", ""))
        full_export.export_full(model, out, info.is_main)
        wait_for_all("exported")
        assert os.path.exists(os.path.join(out, "diffusion_pytorch_model.safetensors.index.json"))
        back = adapter.denoiser_cls.from_pretrained(out, torch_dtype=dtype)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))
        if info.is_main:
            n = len([f for f in os.listdir(out) if f.endswith(".safetensors")])
            print(f"loading ok: {family} {dtype}, {n} shards", flush=True)
# A hub id that is not in the (shared) Hugging Face cache: one rank downloads it, every rank then loads the cached
# snapshot, also under ZeRO-3 (which reads the files). The hub is a folder here: there is no network.
import fnmatch  # noqa: E402
import shutil  # noqa: E402
import types  # noqa: E402

import huggingface_hub  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402

from fewstep.engine.loading import local_model  # noqa: E402

hub, downloads = os.path.join(tmp, "flux"), os.path.join(tmp, "downloads.txt")
constants.HF_HUB_CACHE = os.path.join(tmp, "hf-cache")
snapshot = os.path.join(constants.HF_HUB_CACHE, "models--org--tiny-flux", "snapshots", "0")


def fake_snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None, **kwargs):
    """The hub's snapshot_download: the files of `allow_patterns` (all: None) at `revision` into the cache."""
    assert repo_id == "org/tiny-flux", repo_id
    if not local_files_only:
        assert revision == "c0ffee" * 6 + "abcd", revision  # the commit rank 0 listed, on every downloading rank
        with open(downloads, "a") as fh:
            fh.write(f"rank {info.rank}: {' '.join(allow_patterns or ['*'])}\n")
        for rel in hub_files():
            if allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                os.makedirs(os.path.dirname(os.path.join(snapshot, rel)), exist_ok=True)
                shutil.copy(os.path.join(hub, rel), os.path.join(snapshot, rel))
    if not os.path.isdir(snapshot):
        raise LocalEntryNotFoundError("not cached")
    return snapshot


def hub_files():
    return sorted(os.path.relpath(os.path.join(d, f), hub) for d, _, names in os.walk(hub) for f in names)


class FakeApi:
    def model_info(self, repo_id):
        return types.SimpleNamespace(sha="c0ffee" * 6 + "abcd",
                                     siblings=[types.SimpleNamespace(rfilename=f) for f in hub_files()])


huggingface_hub.snapshot_download = fake_snapshot_download
huggingface_hub.HfApi = FakeApi
constants.HF_HUB_OFFLINE = False
import urllib.request  # noqa: E402

urllib.request.urlopen = lambda *a, **k: None  # the hub answers
if info.is_main:  # the pipeline's other folders beside the sharded transformer saved above
    tiny_root = str(get_adapter("flux").resolve("tiny:flux"))
    shutil.copy(os.path.join(tiny_root, "model_index.json"), hub)
    for sub in ("scheduler", "vae"):
        shutil.copytree(os.path.join(tiny_root, sub), os.path.join(hub, sub))
    shutil.copytree(os.path.join(hub, "vae"), os.path.join(hub, "vae_1_0"))  # a folder that is not a component
    with open(os.path.join(hub, "README.md"), "w") as fh:  # a top-level file diffusers does not load
        fh.write("a model card")
wait_for_all("hub ready")
adapter = get_adapter("flux")
src = local_model(adapter, "org/tiny-flux")
assert src == snapshot, src
cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "org/tiny-flux", "zero_stage": 3,
                         "mixed_precision": "fp32"})
model = load_transformer(adapter, src, torch.float32, build_ds_config(cfg), info.device)
assert all(hasattr(p, "ds_tensor") for p in model.parameters())
with open(downloads) as fh:  # rank 0 (the one cache's first rank) read model_index.json, then the files it names
    calls = fh.read().splitlines()
assert len(calls) == 2 and calls[0] == "rank 0: model_index.json" and calls[1].startswith("rank 0: "), calls
assert "README.md" not in calls[1] and "vae_1_0" not in calls[1] and "vae/config.json" in calls[1], calls
assert not os.path.exists(os.path.join(snapshot, "vae_1_0")) and not os.path.exists(os.path.join(snapshot, "README.md"))
if info.is_main:
    print("hub id ok: downloaded once, loaded partitioned from the cache", flush=True)
teardown()
