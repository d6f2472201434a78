"""Which fused attention kernels a training forward may use, and a gradient-checkpoint function that recomputes
with the same ones.

cuDNN's SDPA is torch's first choice for bf16 attention on Hopper (H100/H200) since torch 2.11, and its backward
returns NaN in dQ when an explicit mask is passed, the sequence length is 64 mod 128 and some query row's
logsumexp falls below ln(FLT_MAX) = -88.7 (pytorch/pytorch#196678; trl#7181 hit it on torch 2.13 through a
"massive activation" head). The forward is fine, so only a forward that builds a graph needs another kernel:
`masked_attention` turns cuDNN's off for it, and PyTorch then picks the memory-efficient kernel (flash takes no mask).
Unmasked calls, and every pass without grad (teacher passes, sampling), keep cuDNN's.

A gradient-checkpointed block recomputes its forward during backward, when such a switch has long been restored:
`checkpoint_with_forward_kernels` (diffusers' `enable_gradient_checkpointing` hook) recomputes under the kernel
switches its forward saw, so the recompute builds the graph the forward would have built.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

_SWITCHES = ("flash", "mem_efficient", "math", "cudnn")  # torch.backends.cuda.<name>_sdp_enabled / enable_<name>_sdp


def _sdpa_switches() -> dict[str, bool]:
    return {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in _SWITCHES}


class sdpa_switches:  # noqa: N801 (used as a context manager, like torch's)
    """Set the given SDPA kernel switches (process-wide, as torch keeps them) and restore all of them after.
    Re-enterable: a graph backpropagated twice (retain_graph) recomputes a checkpointed block twice."""

    def __init__(self, **switches: bool):
        self.switches, self.before = switches, []

    def __enter__(self):
        self.before.append(_sdpa_switches())
        for name, on in self.switches.items():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)

    def __exit__(self, *exc):
        for name, on in self.before.pop().items():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)


def masked_attention(masked: bool):
    """The context for a forward whose attention gets a mask: without cuDNN's SDPA when it builds a graph."""
    if masked and torch.is_grad_enabled():
        return sdpa_switches(cudnn=False)
    return contextlib.nullcontext()


def _recompute_with_forward_kernels():
    """checkpoint's context_fn: nothing around the forward; the forward's switches around the recompute."""
    return contextlib.nullcontext(), sdpa_switches(**_sdpa_switches())


def checkpoint_with_forward_kernels(module, *args, **kwargs):
    """diffusers' gradient checkpointing function (its default, non-reentrant) with the forward's SDPA switches
    restored for the recompute."""
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=_recompute_with_forward_kernels,
                      **kwargs)
