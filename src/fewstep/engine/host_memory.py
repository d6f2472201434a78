"""Host memory per rank: keep glibc from holding on to the memory of freed tensors.

glibc's malloc serves a request from its heap or, at or above M_MMAP_THRESHOLD, with a private mmap that free() hands
back to the OS at once. The threshold starts at 128 KiB and, by default, moves: each time an mmapped block is freed,
it rises to that block's size (up to 32 MiB on 64-bit Linux). So after the first few freed weights, every tensor below
32 MiB comes from the heap, and freed heap memory that lies below a live block is never returned (only the heap's top
is trimmed). A training rank churns exactly such tensors on the host: ZeRO-3's gathered weights under gloo, the
exports' gathered blocks, checkpoint staging, the cache fill. Measured (`bench/memory.py`, bench/RESULTS.md): a 1.4 B
real-width Qwen-Image TwinFlow LoRA run under ZeRO-3 peaked at 5.8 GiB per rank while training with the moving
threshold, 4.2 GiB with it fixed (1 MiB), at the same step time and loss.

Setting the threshold explicitly (mallopt) also turns glibc's adjustment off. The trainer does it first thing, per
rank (`malloc_mmap_threshold`); a MALLOC_MMAP_THRESHOLD_ in the environment is the user's own setting and wins. The
default, 1 MiB, sends every weight-sized tensor through mmap and keeps small ones (activations of small models, CPU
work) on the heap, where they are fast: at glibc's initial 128 KiB the CPU demo's TwinFlow run took 148 s instead of
89 s; at 1 MiB, 93 s.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MAX_THRESHOLD = 32 * 2 ** 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
DEFAULT_THRESHOLD = 2 ** 20  # the trainer's default (`malloc_mmap_threshold`) and launcher/sample.py's


def fix_mmap_threshold(nbytes: int) -> str:
    """Fix glibc's mmap threshold at `nbytes` for this process (0: keep glibc's moving threshold).

    Returns what was done, as a short phrase for the log."""
    if nbytes <= 0:
        return "glibc's moving mmap threshold (malloc_mmap_threshold 0)"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} from the environment"
    if not sys.platform.startswith("linux"):
        return f"the platform's allocator ({sys.platform}: no glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "the C library's allocator (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(nbytes)) != 1:  # not glibc (musl's mallopt is a stub), or a refused value
        return "the C library's allocator (mallopt refused the mmap threshold)"
    size = f"{nbytes / 2 ** 20:g} MiB" if nbytes % 2 ** 20 == 0 else f"{nbytes / 1024:g} KiB"
    return f"glibc mmap threshold fixed at {size}"
