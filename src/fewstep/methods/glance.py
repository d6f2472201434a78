"""Glance: train on a fixed list of timesteps (Slow = early ones, Fast = late ones) and chain at inference.

`flow_custom_timesteps` semantics follow SimpleTuner (what users bring): a JSON list, a comma/semicolon string or a
list; if every value is <= 1 the values are sigmas, otherwise 0-1000 timesteps (sigma = t / 1000). No shift is ever
applied to the list. Unlike SimpleTuner, bad lists are errors rather than a silent fall-back to normal sampling.
"""
from __future__ import annotations

import json
import math
import warnings
from typing import Any, Optional, Sequence

import torch


class TimestepListError(ValueError):
    pass


def parse_custom_timesteps(value: Any, key: str = "flow_custom_timesteps") -> list[float]:
    """Turn a user's timestep list into sigmas in [0, 1], or raise naming `key`."""
    items = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise TimestepListError(f"'{key}': not a valid JSON list ({e})") from None
        else:
            items = [s for s in text.replace(";", ",").split(",") if s.strip()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    if not isinstance(items, (list, tuple)):
        raise TimestepListError(f"'{key}' must be a list of numbers, got {value!r}")
    values = []
    for v in items:
        try:
            if isinstance(v, bool):  # JSON's true is 1.0 to float(): sigma 1, not a timestep anyone wrote
                raise TypeError
            f = float(v)
        except (TypeError, ValueError):
            raise TimestepListError(f"'{key}': {v!r} is not a number") from None
        if not math.isfinite(f):
            raise TimestepListError(f"'{key}': non-finite value {v!r}")
        if f < 0:
            raise TimestepListError(f"'{key}': negative value {f}; expected sigmas in [0, 1] or timesteps in [0, 1000]")
        values.append(f)
    if not values:
        raise TimestepListError(f"'{key}' is empty: give at least one sigma or timestep")
    if all(v <= 1.0 for v in values):
        return values
    small = [v for v in values if 0.0 < v < 1.0]
    if small:  # 0.5 among timesteps would be sigma 0.0005: almost surely a sigma in a timestep list
        raise TimestepListError(f"'{key}': {small[0]} reads as a sigma but {max(values)} as a timestep; give all "
                                "values as sigmas (<= 1) or all as timesteps (0-1000)")
    if any(v > 1000.0 for v in values):
        raise TimestepListError(f"'{key}': {max(values)} is out of range; timesteps must lie in [0, 1000] "
                                f"(or give sigmas, all <= 1)")
    return [v / 1000.0 for v in values]


class CustomTimestepSampler:
    """Draws training sigmas from a fixed list.

    fixed-list: each sample draws uniformly with replacement. round-robin: a cursor walks the list over the *global*
    batch; rank r takes positions cursor + r*B + i of each micro-step, and the cursor advances by B*world_size. The
    cursor is part of the checkpoint so a resumed run continues the cycle exactly.
    """

    def __init__(self, sigmas: Sequence[float], mode: str = "fixed-list", *, batch_size: int = 1,
                 rank: int = 0, world_size: int = 1):
        if mode not in ("fixed-list", "round-robin"):
            raise TimestepListError(f"'flow_timesteps_mode' must be 'fixed-list' or 'round-robin', got {mode!r}")
        self.sigmas = torch.tensor(list(sigmas), dtype=torch.float32)
        self.mode, self.batch_size, self.rank, self.world_size = mode, batch_size, rank, world_size
        self.cursor = 0
        if mode == "round-robin" and len(self.sigmas) < batch_size * world_size:
            warnings.warn(f"round-robin list of {len(self.sigmas)} timesteps is shorter than the global batch "
                          f"({batch_size * world_size}): some timesteps repeat within one step")

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sigmas for this rank's next micro-batch."""
        n = len(self.sigmas)
        if self.mode == "fixed-list":
            return self.sigmas[torch.randint(0, n, (self.batch_size,), generator=generator)]
        start = self.cursor + self.rank * self.batch_size
        idx = (start + torch.arange(self.batch_size)) % n
        self.cursor = (self.cursor + self.batch_size * self.world_size) % n
        return self.sigmas[idx]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


# The paper's lists (CSU-JPG/Glance train_configs): each is its model's own 10-step schedule, split 5 + 5. Qwen-Image's
# are shifted further toward sigma 1 than FLUX.1's; SimpleTuner's GLANCE.md applies the Qwen lists to FLUX.
REFERENCE_TIMESTEPS = {
    "qwen_image": {"Qwen-Image": ([1000.0, 979.1915, 957.5157, 934.9171, 911.3354],
                                  [886.7053, 745.0728, 562.9505, 320.0802, 20.0])},
    "flux": {"FLUX.1-dev": ([1000.0, 986.9786, 973.2042, 958.6094, 943.1188],
                            [926.6473, 825.7017, 677.9868, 441.1997, 60.5503])},
}


def foreign_reference_list(model_family: str, sigmas: Sequence[float]) -> Optional[str]:
    """A note when `sigmas` is another model's Glance list (the paper's Slow or Fast list of a family other than
    `model_family`), naming this family's own list where the paper gives one; None otherwise."""
    for family, models in REFERENCE_TIMESTEPS.items():
        for model, lists in models.items():
            for part, ts in zip(("Slow", "Fast"), lists):
                if family == model_family or len(ts) != len(sigmas):
                    continue
                if all(abs(t / 1000 - s) < 1e-6 for t, s in zip(ts, sigmas)):
                    own = next(iter(REFERENCE_TIMESTEPS.get(model_family, {}).items()), None)
                    hint = (f"{own[0]}'s {part} list is {', '.join(map(str, own[1][part == 'Fast']))}" if own
                            else f"a {model_family} list is points of its own sampling schedule")
                    return (f"this is {model}'s {part} list from the Glance paper, points of that model's shifted "
                            f"schedule, not of {model_family}'s; {hint}")
    return None


def glance_schedule(slow: Sequence[float], fast: Sequence[float]) -> tuple[list[float], int]:
    """The inference sigma schedule: Slow's list, then Fast's, then 0. Returns (sigmas, index where Fast starts).

    Each list is a set of training sigmas, so its order and repeats do not matter: each is sorted down and its repeats
    dropped, and a Fast list given down to 0 (SimpleTuner takes it) loses that 0, the end of sampling where no step
    is taken. The Slow phase stops at the first Fast sigma (it must not denoise to 0): every Slow sigma must lie above
    every Fast one.
    """
    if not slow or not fast:
        raise TimestepListError("Glance needs a non-empty Slow and Fast list")
    slow, fast = (sorted({float(s) for s in part}, reverse=True) for part in (slow, fast))
    if len(fast) > 1 and fast[-1] == 0:
        fast = fast[:-1]
    if slow[-1] <= fast[0]:
        raise TimestepListError(f"every Slow sigma must lie above every Fast one: Slow's lowest is {slow[-1]:.6g}, "
                                f"Fast's highest {fast[0]:.6g}")
    if fast[-1] <= 0:
        raise TimestepListError("the Fast list needs a sigma > 0 (0 is appended as the end of sampling)")
    return slow + fast + [0.0], len(slow)


def listed_schedule(listed: Sequence[float], base: Sequence[float]) -> tuple[list[float], list[bool]]:
    """The sampling schedule of a model trained on the `listed` sigmas alone (one Glance half trained on its own, as
    SimpleTuner's flow_custom_timesteps runs are): the list between its ends, the `base` schedule above and below it,
    then 0. Returns (sigmas, on_list): on_list[i] says whether step i starts at a listed sigma, the one step the
    trained model is made for; the base model takes the others (a Slow list alone would otherwise jump from its last
    sigma to 0, and a Fast list start from pure noise as if it were at its first sigma)."""
    steps = sorted(set(float(s) for s in listed), reverse=True)
    hi, lo = steps[0], steps[-1]
    sigmas = sorted(set(steps) | {float(s) for s in base if s > hi or s < lo} | {0.0}, reverse=True)
    return sigmas, [s in set(steps) for s in sigmas[:-1]]
