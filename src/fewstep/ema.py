"""EMA of the trained weights over this rank's fp32 master partition (sharded like the optimizer state).

Decay warm-up follows the TwinFlow reference: the first update copies (d = 0), then d <- d + (1 - d)(D - d)/2, which
approaches the target D. D = 1 freezes the teacher at the initial weights (the base model under LoRA); D = 0 makes it
track the live model. The update runs through `fewstep.kernels.ema_update_` (Triton on GPU, torch foreach on CPU).
"""
from __future__ import annotations

import torch

from fewstep.kernels import ema_update_
from fewstep.kernels._dispatch import placed_backend


class EMA:
    def __init__(self, sources: list[torch.Tensor], target_decay: float, backend: str = "auto"):
        self.sources = sources
        # in host memory (offload_optimizer) pinned as the masters are: the teacher swap sends it to the GPU in pieces
        self.shadow = [torch.empty(s.shape, dtype=torch.float32, pin_memory=True).copy_(s) if s.is_pinned()
                       else s.detach().float().clone() for s in sources]
        self.target_decay = float(target_decay)
        self.decay = 0.0
        self.backend = placed_backend(backend, self.shadow)  # Triton where the shadow is on the GPU

    @property
    def frozen(self) -> bool:
        """Target decay 1: the shadow stays at the initial weights and is never updated."""
        return self.target_decay >= 1.0

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step at the current decay; returns the decay used."""
        d = self.decay
        if not self.frozen:
            ema_update_(self.shadow, self.sources, d, backend=self.backend)
            self.decay = d + (1.0 - d) * (self.target_decay - d) / 2.0
        return d

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the current weights (a new Glance phase)."""
        for s, src in zip(self.shadow, self.sources):
            s.copy_(src)
        self.decay = 0.0

    def state_dict(self) -> dict:
        """The shadow itself, not a copy, for an immediate `torch.save`: torch.save moves one tensor at a time to host
        memory, where a `.cpu()` of the whole shadow here would hold a second full copy of it (10 GiB per rank for a
        20B full fine-tune on 8 GPUs) while the checkpoint is written."""
        return {"shadow": list(self.shadow), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
        self.decay = float(state["decay"])
