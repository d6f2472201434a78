"""Exporting a full fine-tune as a stock diffusers model folder, one block at a time.

The transformer is written in `save_pretrained` layout with sharded safetensors and the diffusers index file
(`diffusion_pytorch_model-0000i-of-0000n.safetensors` + `diffusion_pytorch_model.safetensors.index.json`), so
`TransformerClass.from_pretrained(out_dir)` loads it. Under ZeRO-3 the parameters are gathered one block at a time
(a transformer block, or the small modules around them together), so the extra memory is about one block on every
rank plus, on rank 0, the shard being assembled (at most SHARD_BYTES) — never the whole model. Other stages hold the
full weights anyway and are written the same way. TwinFlow's any-step embeddings go beside the model, not inside it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

from torch import nn

from fewstep import faults
from fewstep.checkpoint_files import fsync, fsync_tree
from fewstep.engine import distributed
from fewstep.models import anystep

SHARD_BYTES = 1 << 30  # a shard is written once it holds this much (each holds whole blocks)
WEIGHTS = "diffusion_pytorch_model"


def param_groups(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The model's parameters in export order: one group per block of a ModuleList (transformer_blocks.0, ...), a
    block that itself holds ModuleLists (a UNet's down_blocks.0: resnets, attentions) split the same way, and one
    group for everything else; the any-step embeddings are left out."""
    blocks, rest = [], []
    _collect(model, "", blocks, rest, skip="anystep_embed")
    return [g for g in [rest, *blocks] if g]


def _collect(module: nn.Module, prefix: str, blocks: list, rest: list, skip: str | None = None) -> None:
    for child_name, child in module.named_children():
        if child_name == skip:
            continue
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                _add_block(block, f"{prefix}{child_name}.{i}.", blocks)
        elif _holds_blocks(child):  # e.g. a UNet's mid_block (resnets, attentions)
            _add_block(child, f"{prefix}{child_name}.", blocks)
        else:
            rest += [(f"{prefix}{child_name}.{n}", p) for n, p in child.named_parameters()]
    rest += [(prefix + n, p) for n, p in module.named_parameters(recurse=False)]


def _holds_blocks(module: nn.Module) -> bool:
    return any(isinstance(c, nn.ModuleList) for c in module.children())


def _add_block(block: nn.Module, name: str, blocks: list) -> None:
    """One group for a block; a block of blocks (a UNet's down_blocks.0) is split the same way as the model."""
    if not _holds_blocks(block):
        blocks.append([(name + n, p) for n, p in block.named_parameters()])
        return
    own = []
    _collect(block, name, blocks, own)
    blocks.append(own)


def _gathered(params):
    """Materialise ZeRO-3 partitioned parameters for the block (no-op otherwise). Collective."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def export_full(transformer: nn.Module, out_dir: str, is_main: bool) -> None:
    """Write `out_dir` (atomically: a temporary folder renamed at the end). Every rank must call it."""
    from safetensors.torch import save_file

    tmp = out_dir + ".tmp"
    with distributed.uneven_work("export folder"):  # rank 0's (a 20B partial export to remove): a failure reaches all
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            transformer.save_config(tmp)
    shards, pending, size = [], {}, 0

    def flush():
        nonlocal pending, size
        if pending:
            name = f"part-{len(shards):05d}.safetensors"
            save_file(pending, os.path.join(tmp, name), metadata={"format": "pt"})
            shards.append((name, list(pending), sum(t.numel() * t.element_size() for t in pending.values())))
            pending, size = {}, 0

    for group in param_groups(transformer):
        with _gathered([p for _, p in group]), distributed.uneven_work("export"):
            if is_main:
                for name, p in group:
                    pending[name] = p.detach().to("cpu", copy=True).contiguous()
                    size += p.numel() * p.element_size()
                if size >= SHARD_BYTES:
                    flush()
    embed = getattr(transformer, "anystep_embed", None)  # partitioned under ZeRO-3 like any parameter: gathered
    with _gathered(list(embed.parameters()) if embed is not None else []), distributed.uneven_work("export"):
        if is_main:
            buffers = {k: b for k, b in transformer.named_buffers() if k in transformer.state_dict()
                       and not k.startswith("anystep_embed.")}
            pending.update({k: b.detach().to("cpu", copy=True).contiguous() for k, b in buffers.items()})
            flush()
            _write_index(tmp, shards)
            if embed is not None:
                anystep.save_anystep(transformer, tmp)
            fsync_tree(tmp)  # durable before the rename: the run's marker, written after, must not name lost pages
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(out_dir):  # moved aside, not deleted first (minutes on Lustre for a 20B model)
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            fsync(os.path.dirname(os.path.abspath(out_dir)))
            shutil.rmtree(old, ignore_errors=True)
            faults.work_at("export")


def _write_index(folder: str, shards: list[tuple[str, list[str], int]]) -> None:
    """Rename the parts to diffusers' shard names and write the index (a single shard keeps the plain name)."""
    total = 0
    weight_map = {}
    n = len(shards)
    for i, (part, names, nbytes) in enumerate(shards, 1):
        final = f"{WEIGHTS}.safetensors" if n == 1 else f"{WEIGHTS}-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(folder, part), os.path.join(folder, final))
        total += nbytes
        weight_map.update({name: final for name in names})
    if n > 1:
        with open(os.path.join(folder, f"{WEIGHTS}.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh,
                      indent=2)
