"""Per-sample cached conditioning <-> a batch: `collate_cond` stacks (padding variable-length text), `split_cond`
undoes it. Family-independent; every adapter exposes them as `FlowModelAdapter.collate_cond` / `.split_cond`.
"""
from __future__ import annotations

import torch


def collate_cond(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample conditioning (no batch dim) into a batch.

    A key `k` with a companion mask `k + "_mask"` is variable-length text: it is zero-padded along its first axis
    to the longest item, and the mask is padded with zeros. A mask without a zero is left out (as the stock
    pipelines do): every token is valid, and attention without a mask can take the fused (flash) kernels.
    """
    if not items:
        raise ValueError("collate_cond got an empty list")
    keys = set(items[0])
    for i, it in enumerate(items):
        if set(it) != keys:
            raise KeyError(f"collate_cond item {i} has keys {sorted(it)}, expected {sorted(keys)}")
    out = {}
    for k in sorted(keys):
        if k.endswith("_mask") and k[: -len("_mask")] in keys:
            continue  # padded together with its embeddings below
        mk = k + "_mask"
        if mk in keys:
            n = max(it[k].shape[0] for it in items)
            out[k] = torch.stack([_pad0(it[k], n) for it in items])
            mask = torch.stack([_pad0(it[mk], n) for it in items])
            if mask.device.type != "cpu" or not bool(mask.all()):  # host tensors (the cache): no device sync
                out[mk] = mask
        else:
            shapes = {tuple(it[k].shape) for it in items}
            if len(shapes) != 1:
                raise ValueError(f"collate_cond: {k!r} has differing shapes {sorted(shapes)} and no {mk!r}")
            out[k] = torch.stack([it[k] for it in items])
    return out


def split_cond(cond: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Inverse of `collate_cond`: per-sample dicts, masked text trimmed after its last valid token."""
    b = next(iter(cond.values())).shape[0]
    items = [{k: v[i] for k, v in cond.items()} for i in range(b)]
    for it in items:
        for k in list(it):
            mk = k + "_mask"
            if mk in it:
                valid = it[mk].nonzero()
                n = int(valid.max()) + 1 if valid.numel() else 0
                it[k], it[mk] = it[k][:n], it[mk][:n]
    return items


def _pad0(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad t along dim 0 to length n."""
    if t.shape[0] == n:
        return t
    return torch.cat([t, t.new_zeros((n - t.shape[0], *t.shape[1:]))])
