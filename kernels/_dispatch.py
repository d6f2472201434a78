"""Backend choice (Triton kernel vs torch reference) and small Triton helpers shared by the kernel modules."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")
_SWITCH = {"auto": "auto", "on": "triton", "off": "torch"}


def resolve_backend(fused_kernels) -> str:
    """Map the config switch `fused_kernels: auto|on|off` to a backend `auto|triton|torch`.

    YAML reads bare on/off as booleans, so True/False are accepted as on/off.
    """
    key = ("on" if fused_kernels else "off") if isinstance(fused_kernels, bool) else fused_kernels
    if not isinstance(key, str) or key.lower() not in _SWITCH:
        raise ValueError(f"fused_kernels: expected one of 'auto', 'on', 'off', got {fused_kernels!r}")
    return _SWITCH[key.lower()]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read when kernels were decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, *tensors: torch.Tensor | None, op: str) -> bool:
    """Decide whether `op` runs the Triton kernel for these tensors.

    "auto": Triton when the tensors are on CUDA, else the torch reference. "triton": always Triton; CPU tensors need
    the interpreter (TRITON_INTERPRET=1). "torch": the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(x.is_cuda for x in tensors if x is not None)
    if backend == "auto":
        return on_cuda
    if not on_cuda and not interpreting():
        raise RuntimeError(f"{op}: backend='triton' with CPU tensors needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before importing fewstep, or use backend='auto'/'torch'")
    if not on_cuda and not _library_interpreted():
        raise RuntimeError(f"{op}: Triton was imported before TRITON_INTERPRET=1 was set, so its own library "
                           "(tl.sum, ...) cannot run in the interpreter: import fewstep before anything that imports "
                           "triton, export TRITON_INTERPRET=1, or use backend='auto'/'torch'")
    return True


def placed_backend(backend: str, tensors) -> str:
    """The backend for an op on `tensors` that stay where they are: "triton" (`fused_kernels: on`) gives way to the
    torch reference for CPU tensors outside Triton's interpreter, where `use_triton` would refuse (the EMA of fp32
    masters kept in host memory by offload_optimizer, on a GPU run)."""
    if backend == "triton" and not interpreting() and not all(t.is_cuda for t in tensors):
        return "torch"
    return backend


def _library_interpreted() -> bool:
    """Whether Triton's own @jit library functions run in the interpreter. Each @jit function is compiled-mode or
    interpreted from the moment it is decorated: Triton's library when triton is first imported, fewstep's kernels
    when fewstep.kernels is (after `import fewstep` set TRITON_INTERPRET)."""
    from triton.language import standard
    from triton.runtime.jit import JITFunction  # compiled-mode; the interpreter's InterpretedFunction is not one

    return not isinstance(standard.sum, JITFunction)


def block_for(n: int, block: int) -> int:
    """The launch BLOCK: the requested power of two, shrunk to the next power of two >= n for small tensors."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"BLOCK must be a positive power of two, got {block}")
    return max(16, min(block, triton.next_power_of_2(max(int(n), 1))))


def round_bf16() -> bool:
    """Whether kernels must round fp32 -> bf16 to nearest-even by hand (the interpreter truncates)."""
    return interpreting()


@triton.jit
def to_out(x, OUT_DTYPE: tl.constexpr, RTNE_BF16: tl.constexpr):
    """Cast an fp32 tile to the output dtype; for bf16 under the interpreter, round to nearest-even by hand."""
    if RTNE_BF16 and OUT_DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(OUT_DTYPE)


_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype):
    """Triton dtype for a torch floating dtype (float32/float64/bfloat16/float16)."""
    if dtype not in _TL:
        raise TypeError(f"unsupported dtype {dtype}: expected one of {list(_TL)}")
    return _TL[dtype]
