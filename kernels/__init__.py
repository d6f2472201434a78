"""Triton kernels with their pure-PyTorch references (installed as fewstep.kernels)."""
