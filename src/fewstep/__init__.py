"""fewstep: Glance and TwinFlow few-step training on DeepSpeed ZeRO."""
import os as _os

# Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it must be set before any kernel module is
# imported. Without a GPU there is no Triton driver at all; the interpreter makes the kernels runnable (slowly) on CPU.
if "TRITON_INTERPRET" not in _os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            _os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass

__version__ = "0.1.0"
