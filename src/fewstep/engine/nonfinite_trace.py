"""Where a non-finite value first appears in the denoiser (`nan_trace: true`), for a skipped step's message.

A forward hook on every module checks its floating-point outputs; the first module of a step (in call order, over
all the step's passes: student, teacher, twin) whose output is non-finite is recorded, with whether its inputs were
already non-finite (finite inputs and a non-finite output name the culprit; non-finite inputs point at whatever ran
before it outside a module, or at the data). A hook on each output tensor does the same for gradients, in backward
order: the first module output whose gradient is non-finite (named after the outermost module returning that
tensor). The culprit is then the backward of what consumed that output: for the model's own output, the loss. Each
check is a device-wide reduction read back to the host, so this slows every step: a diagnosis switch, off by default.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from fewstep.engine.nonfinite import all_finite


def _float_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _float_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _float_tensors(o)]  # diffusers' outputs are dicts too
    return []


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(all_finite(t) for t in tensors if t.numel())


class NonFiniteTrace:
    """Hooks on every module of `model`; `report()` says what this step saw, `reset()` starts the next step."""

    def __init__(self, model: nn.Module):
        self.forward: str | None = None
        self.backward: str | None = None
        self.passes = 0  # forward calls of the top module this step
        self._top = model
        self._handles = [m.register_forward_hook(functools.partial(self._on_forward, name or "(model)"),
                                                 with_kwargs=True) for name, m in model.named_modules()]

    def _on_forward(self, name: str, module: nn.Module, args, kwargs, output) -> None:
        outs = _float_tensors(output)
        if self.forward is None and not _finite(outs):
            inputs = "finite" if _finite(_float_tensors(args) + _float_tensors(kwargs)) else "already non-finite"
            self.forward = f"{name} ({type(module).__name__}) output in forward pass {self.passes + 1}, inputs {inputs}"
        if module is self._top:  # its hook runs last in a pass
            self.passes += 1
        for t in outs:  # one gradient hook per tensor, named after the outermost module returning it
            if t.requires_grad:
                if not hasattr(t, "_fewstep_trace_name"):
                    t._fewstep_trace_name = []  # a holder the hook reads (the tensor may be gone by backward)
                    t.register_hook(functools.partial(self._on_grad, t._fewstep_trace_name))
                t._fewstep_trace_name[:] = [f"{name} ({type(module).__name__})"]

    def _on_grad(self, owner: list, grad: torch.Tensor) -> None:
        if self.backward is None and grad is not None and not _finite([grad]):
            self.backward = f"the output of {owner[0]}"

    def reset(self) -> None:
        self.forward = self.backward = None
        self.passes = 0

    def report(self) -> str:
        """One clause for the skip message: the first non-finite forward output and output gradient seen."""
        fwd = self.forward or "every module output finite"
        bwd = f"first non-finite gradient at {self.backward}" if self.backward else "every gradient finite"
        return f"first non-finite here: forward: {fwd}; backward: {bwd}"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
