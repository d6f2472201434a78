"""Host memory per rank under DeepSpeed's CPU offload (DeepSpeed 0.19.8, torch 2.13), one allocation at a time.

On a GPU run fewstep pins the offloaded buffers (`pin_memory` in `build_ds_config`), and with DeepSpeed's default pin
backend (DS_PIN_MEMORY_BACKEND unset: `accelerator.pin_memory` -> `tensor.pin_memory()`) every pinned tensor is one
block of torch's CachingHostAllocator, which rounds it up to a power of two (ATen/core/CachingHostAllocator.h,
`allocate`: `PowerOf2Ceil(size)` while size <= pinned_max_round_threshold and <= pinned_max_cached_size, both
unlimited by default) and keeps freed blocks cached. Rounding is per allocation. Per rank, with n ranks, w = 2 (bf16)
or 4, one param group (fewstep passes one) and s its partition (Pt/n elements):

ZeRO-1/2 optimizer offload (deepspeed/runtime/zero/stage_1_and_2.py)
    pinned    fp32 master 4s (:565), bit16 copy-back buffer w*s (:572), fp32 grads 4s (:940), the gradient staging
              buffer, w * the largest trainable tensor (:657), fewstep's EMA shadow 4s (fewstep/ema.py pins it like
              the master); with gradient accumulation, w * numel of each tensor overlapping the partition (:1824)
    pageable  Adam m, v 8s (torch AdamW and DeepSpeedCPUAdam (ops/adam/cpu_adam.py:161) `zeros_like`: not pinned);
              torch AdamW's CPU for-loop holds two 4s temporaries at the step (DeepSpeedCPUAdam: none)
ZeRO-3 optimizer offload (deepspeed/runtime/zero/stage3.py), per sub-group of >= sub_group_size partition elements
    pinned    fp32 grads per sub-group (:1337), one flat w*s reduced-gradient buffer (:791)
    pageable  fp32 master per sub-group (:1157, `.to(cpu)` + clone), m, v, the EMA shadow (the masters are not
              pinned), AdamW's temporaries for the largest sub-group
ZeRO-3 parameter offload
    pinned    each non-persistent tensor's w*ceil(numel/n) partition (runtime/zero/partition_parameters.py:1842), one
              flat w*s buffer the trainable partitions move into (stage3.py:906); their own blocks then go back to
              torch's pinned cache, which keeps them (unless above pinned_max_cached_size)

PYTORCH_ALLOC_CONF=pinned_max_round_threshold_mb:M,pinned_max_cached_size_mb:M allocates pinned blocks above M MiB at
their exact size (c10/core/AllocatorConfig.h). Both keys: torch 2.13's `get_free_block` hands out any cached block of
the same power-of-two class without checking its size, so exact-size blocks must not be cached. The planner reads
the variable (PYTORCH_CUDA_ALLOC_CONF if it is unset) to plan what the run will do. DS_PIN_MEMORY_BACKEND=native
(deepspeed/utils/pin_memory.py: posix_memalign + mlock + cudaHostRegister) pins DeepSpeed's buffers exactly but
needs the JIT-built pin_memory op and a memlock limit above them, and fewstep's EMA is still pinned by torch: not
modelled.
"""
from __future__ import annotations

import os

NOTE_REMEDY_MB = 64  # the threshold the plan's note suggests: DeepSpeed's big buffers exact, small ones cached


def pinned_limits(env=os.environ) -> tuple[float, float]:
    """(largest pinned block torch rounds, largest it caches) in bytes, from PYTORCH_ALLOC_CONF as torch reads it."""
    conf = env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    opts = dict(kv.split(":", 1) for kv in conf.replace(" ", "").split(",") if ":" in kv)
    mb = lambda key: float(opts[key]) * 2 ** 20 if key in opts else float("inf")  # noqa: E731
    cache = mb("pinned_max_cached_size_mb")
    return min(mb("pinned_max_round_threshold_mb"), cache), cache


def pow2(nbytes: float) -> float:
    """torch's PowerOf2Ceil."""
    return float(1 << (int(nbytes) - 1).bit_length()) if nbytes > 1 else nbytes


def sub_groups(parts: list[int], size: float) -> list[int]:
    """ZeRO-3's optimizer sub-groups (stage3.py `_create_fp16_sub_groups`): elements of each."""
    if size >= sum(parts):
        return [sum(parts)]
    groups, acc = [], 0
    for i, p in enumerate(parts):
        acc += p
        if acc >= size or i == len(parts) - 1:
            groups, acc = groups + [acc], 0
    return groups


def host_buffers(c, *, stage: int, offload_optimizer: bool, offload_param: bool, n: int, w: int, ema: bool,
                 knobs) -> list[tuple[str, float, bool, float]]:
    """(what, bytes, pinned, allocations per rank) of each host allocation on one rank (module docstring)."""
    pin = knobs.device == "cuda"  # fewstep pins exactly when CUDA is there
    train = list(c.trainable_sizes) or [c.trainable]
    frozen = list(c.frozen_sizes) or ([c.frozen] if c.frozen else [])
    temps = 0 if knobs.fused_adam else 2
    bufs = []
    if offload_optimizer and stage < 3:
        s = -(-c.trainable // n)
        bufs += [("fp32 master", 4 * s, pin, 1), ("bit16 copy-back", w * s, pin, 1), ("fp32 grads", 4 * s, pin, 1),
                 ("grad staging", w * max(train), pin, 1), ("Adam m, v", 4 * s, False, 2),
                 ("AdamW step temporaries", 4 * s, False, temps), ("EMA", 4 * s, pin, int(ema))]
        if knobs.accumulation > 1:  # every tensor overlapping a rank's partition, averaged over the ranks
            at = 0
            for t in train:
                bufs.append(("accumulated grads", w * t, pin, ((at + t - 1) // s - at // s + 1) / n))
                at += t
    elif offload_optimizer:
        groups = sub_groups([-(-t // n) for t in train], knobs.sub_group_size)
        bufs.append(("reduced grads", w * sum(groups), pin, 1))
        for g in groups:
            bufs += [("fp32 grads", 4 * g, pin, 1), ("fp32 master", 4 * g, False, 1), ("Adam m, v", 4 * g, False, 2),
                     ("EMA", 4 * g, False, int(ema))]
        bufs.append(("AdamW step temporaries", 4 * max(groups), False, temps))
    if offload_param:
        keep = lambda t: t > knobs.param_persistence_threshold  # noqa: E731  (persistent ones stay on the GPU)
        bufs.append(("trainable params", w * sum(-(-t // n) for t in train), pin, 1))
        bufs += [("frozen param", w * -(-t // n), pin, 1) for t in frozen if keep(t)]
        bufs += [("cached param", w * -(-t // n), pin, 1) for t in train
                 if keep(t) and pin and w * -(-t // n) <= knobs.pinned_cache_max]
    return [b for b in bufs if b[3]]


def host_bytes(bufs, knobs, exact: bool = False) -> float:
    """Bytes the allocations take: pinned ones rounded to a power of two up to the allocator's threshold."""
    return sum(k * (pow2(b) if pin and not exact and b <= knobs.pinned_round_max else b) for _, b, pin, k in bufs)
