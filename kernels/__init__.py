"""Triton kernels with their pure-PyTorch references (installed as fewstep.kernels).

Public dispatchers (`kernels/api.py`) take `backend="auto"|"triton"|"torch"`: "auto" runs the Triton kernel when the
tensors are on CUDA and the reference (`fewstep.kernels.reference`) otherwise; "triton" forces the kernel (CPU tensors
need TRITON_INTERPRET=1, which `import fewstep` sets when CUDA is absent); "torch" forces the reference.
`resolve_backend(cfg.fused_kernels)` maps the config switch auto|on|off to these names.
"""
# Found as a bare top-level `kernels` instead (the repository root on sys.path: `python -m pytest` or a notebook
# there; transformers imports any `kernels` it finds while looking for Hugging Face's kernel-hub package), the package
# stays empty: importing Triton here would fix its mode before `import fewstep` can set TRITON_INTERPRET (the
# interpreter then cannot run Triton's own library functions, e.g. tl.sum), and without a __version__ transformers does
# not take this folder for the hub package.
if __name__ == "fewstep.kernels":
    from .api import ema_update_, rcgm_substep_, rcgm_target_loss, resolve_backend

    __all__ = ["ema_update_", "rcgm_substep_", "rcgm_target_loss", "resolve_backend"]
