"""2 ranks: ZeRO-3 partitioned loading of sharded safetensors and block-by-block sharded export, for tiny Flux and
Qwen-Image transformers, in fp32 and bf16. Prints "loading ok: ..." per case.

Usage: torchrun --nproc_per_node 2 loading_worker.py TMPDIR
"""
import os
import sys

import deepspeed
import torch

from fewstep import full_export
from fewstep.config import load_config
from fewstep.engine.deepspeed_engine import build_ds_config
from fewstep.engine.distributed import setup_distributed, teardown, wait_for_all
from fewstep.engine.loading import INDEX_NAME, load_transformer
from fewstep.models import get_adapter
from fewstep.models.tiny import build_tiny_pipeline

tmp = sys.argv[1]
info = setup_distributed()
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
        assert all(hasattr(p, "ds_tensor") for p in params.values())
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
teardown()
