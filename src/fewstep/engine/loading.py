"""Loading the transformer to train with bounded memory per rank.

- ZeRO stages 0-2: `from_pretrained` straight into the training dtype and onto this rank's device. diffusers builds
  the model empty and fills it shard by shard, so bf16 weights never pass through an fp32 copy and never sit whole
  in host memory (eight ranks of a node would otherwise each hold the whole model on the host at once).
- ZeRO-3: the model is built inside `deepspeed.zero.Init`, which partitions every parameter as soon as its module is
  constructed (a module's own parameters are the largest thing ever whole on a rank), and each rank then reads only
  its own slice of every tensor from the memory-mapped safetensors files. No rank ever holds the whole model, on the
  host or on the device. The trainable fp32 masters stay DeepSpeed's (made from these partitions at initialize).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct

import torch
from torch import nn

from fewstep.engine import distributed
from fewstep.engine.nonfinite import owned_values
from fewstep.engine.sharing import sharing_group
from fewstep.errors import ConfigError, ModelSourceError
from fewstep.models.source import INDEX_FILE, folder_components

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


def local_model(adapter, name: str) -> str:
    """`adapter.resolve(name)` as a local folder on every rank (collective).

    A hub id that is not in the local Hugging Face cache yet is downloaded once per set of ranks that share that
    cache (the first rank of each set; the others wait without a collective timeout): the commit rank 0 finds, so
    every node trains the same revision, and only the files diffusers loads (`pipeline_files`). Otherwise every rank
    of every node would download the model at once, and the ZeRO-3 load reads the safetensors files themselves,
    which a hub id does not name."""
    with distributed.uneven_work("model source"):  # may fail on one rank only (its cache, its network)
        source = adapter.resolve(name)  # a cached hub id is its snapshot folder already
    if not distributed.any_rank(not os.path.isdir(source)):  # one decision: every rank takes the same collectives
        return source
    from huggingface_hub import HfApi, constants, snapshot_download

    os.makedirs(constants.HF_HUB_CACHE, exist_ok=True)
    with distributed.uneven_work("hub listing"):
        if distributed.rank() == 0:
            info = HfApi().model_info(name)
            files = [s.rfilename for s in info.siblings]
            components = None
            if INDEX_FILE in files:  # the pipeline's components: its other folders are not loaded
                folder = snapshot_download(name, revision=info.sha, allow_patterns=[INDEX_FILE])
                components = folder_components(folder)
            listing = (info.sha, pipeline_files(files, components))
    revision, wanted = distributed.broadcast_object(listing if distributed.rank() == 0 else None)
    group = sharing_group(constants.HF_HUB_CACHE)
    with distributed.uneven_work("model download"):
        if group.index == 0:
            print(f"fewstep: rank {distributed.rank()} downloading {name}@{revision[:10]} into "
                  f"{constants.HF_HUB_CACHE}", flush=True)
            snapshot_download(name, revision=revision, allow_patterns=wanted)
    with distributed.uneven_work("model source"):
        return adapter.resolve(snapshot_download(name, revision=revision, local_files_only=True))


_OTHER_FORMATS = (".onnx", ".onnx_data", ".pb", ".msgpack", ".h5", ".ckpt", ".gguf", ".xml")
_VARIANT = re.compile(r"\.(fp16|bf16|fp8|int8|ema|non_ema)(-\d+-of-\d+)?\.(safetensors|bin)$|\.index\.\w+\.json$")


def pipeline_files(files: list[str], components: set[str] | None = None) -> list[str]:
    """Of a hub pipeline repo's files, the ones diffusers' `from_pretrained` loads: model_index.json and the files of
    each component folder (`components`, from model_index.json; None: every folder; SDXL base also ships
    `vae_1_0/`, `vae_decoder/`, `vae_encoder/`), without single-file checkpoints and pictures at the top level
    (FLUX.1-dev: 24 GB), precision variants (`*.fp16.safetensors`), other formats (ONNX, OpenVINO, Flax,
    TensorFlow), and a folder's PyTorch `.bin` weights where it has safetensors."""
    with_safetensors = {f.split("/")[0] for f in files if "/" in f and f.endswith(".safetensors")}
    keep = [f for f in files if f == INDEX_FILE]
    for f in files:
        folder, _, rest = f.partition("/")
        base = os.path.basename(f)
        if not rest or _VARIANT.search(base) or base.endswith(_OTHER_FORMATS) or base.startswith("openvino"):
            continue
        if components is not None and folder not in components:
            continue
        if base.endswith(".bin") and folder in with_safetensors:
            continue
        keep.append(f)
    return keep


def load_transformer(adapter, source: str, dtype: torch.dtype, ds_config: dict, device: torch.device) -> nn.Module:
    """The family's denoiser (transformer or UNet) from a resolved pipeline folder, partitioned at birth under ZeRO-3
    (collective)."""
    folder = os.path.join(source, adapter.denoiser_subfolder)
    if ds_config["zero_optimization"].get("stage") != 3:
        with distributed.uneven_work("model load"):  # ranks read from disk at different speeds
            onto = {"device_map": {"": device}} if device.type == "cuda" else {}  # CPU: where it loads anyway
            return adapter.denoiser_cls.from_pretrained(source, subfolder=adapter.denoiser_subfolder, torch_dtype=dtype,
                                                     **onto)
    import deepspeed

    with distributed.uneven_work("model config"):  # each node reads its copy: a failure on one reaches every rank
        config = adapter.denoiser_cls.load_config(folder)
    # from_config runs every parameter's initialiser (overwritten below; the trainer restores its RNG stream after)
    # The dtype comes from the config's bf16 / fp16 sections: zero.Init's own `dtype` argument is dropped where the
    # accelerator lacks fp16 (DeepSpeed 0.19 reads `dtype or fp16 if fp16_supported else bf16`: an fp32 run on a CPU
    # without AVX512-FP16 was built in bf16).
    init = deepspeed.zero.Init(config_dict_or_path=ds_config)
    if init.dtype != dtype:
        raise ConfigError(f"the DeepSpeed config builds ZeRO-3 parameters in {init.dtype}, the run trains in {dtype}: "
                          "its bf16 / fp16 sections must match mixed_precision")
    with init:  # a broadcast per parameter
        model = adapter.denoiser_cls.from_config(config)
    with distributed.uneven_work("partitioned load"):
        load_partitioned(model, weight_files(folder))
    return model


def weight_files(folder: str) -> dict[str, str]:
    """tensor name -> safetensors file, from the sharded index or the single weights file."""
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        return {name: os.path.join(folder, f) for name, f in weight_map.items()}
    single = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(single):
        raise ModelSourceError(f"no {WEIGHTS_NAME} (or {INDEX_NAME}) in '{folder}'")
    f = SafetensorsFile(single)
    f.close()
    return {name: single for name in f.header if name != "__metadata__"}


@torch.no_grad()
def load_partitioned(model: nn.Module, files: dict[str, str]) -> None:
    """Copy each ZeRO-3 parameter's slice owned by this rank (and every buffer) from the safetensors files.

    A ZeRO-3 parameter is a flat partition `p.ds_tensor` of `p.ds_numel` elements split evenly over ranks (the last
    partition padded); this rank reads exactly the bytes of its slice with plain file reads (`SafetensorsFile`):
    nothing is memory-mapped, so no page of another rank's slice ever counts against this rank's memory.
    """
    params = dict(model.named_parameters())
    buffers = {k: v for k, v in model.named_buffers() if k in model.state_dict()}
    missing = sorted((set(params) | set(buffers)) - set(files))
    if missing:
        raise ModelSourceError(f"the checkpoint lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")
    opened: dict[str, SafetensorsFile] = {}

    def source(name: str) -> SafetensorsFile:
        if files[name] not in opened:
            opened[files[name]] = SafetensorsFile(files[name])
        return opened[files[name]]

    try:
        for name, p in params.items():
            if not hasattr(p, "ds_tensor"):  # not partitioned (created outside zero.Init): copy it whole
                p.data.copy_(source(name).read(name).view(p.shape))
                continue
            owned = owned_values(p)  # this rank's slice, from element rank * (partition size) on
            if owned.numel():
                owned.copy_(source(name).read(name, distributed.rank() * p.ds_tensor.numel(), owned.numel()))
        for name, b in buffers.items():
            b.copy_(source(name).read(name).view(b.shape))
    finally:
        for f in opened.values():
            f.close()


class SafetensorsFile:
    """Reads element ranges of tensors from a .safetensors file with plain reads (the format: an 8-byte little-endian
    header length, a JSON header of dtype / shape / byte offsets per tensor, then the raw little-endian data)."""

    DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: str):
        self.path, self.fh = path, open(path, "rb")
        (size,) = struct.unpack("<Q", self.fh.read(8))
        self.header = json.loads(self.fh.read(size))
        self.base = 8 + size

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of tensor `name` in row-major order, as a flat tensor."""
        info = self.header[name]
        dtype = self.DTYPES[info["dtype"]]
        item = torch.empty((), dtype=dtype).element_size()
        total = math.prod(info["shape"])
        count = total - start if count is None else count
        if start < 0 or start + count > total:
            raise ValueError(f"{self.path}: {name} has {total} elements, asked for [{start}, {start + count})")
        buf = bytearray(count * item)
        self.fh.seek(self.base + info["data_offsets"][0] + start * item)
        if self.fh.readinto(buf) != len(buf):
            raise ModelSourceError(f"{self.path} is truncated (tensor {name})")
        return torch.frombuffer(buf, dtype=dtype) if count else torch.empty(0, dtype=dtype)

    def close(self) -> None:
        self.fh.close()
