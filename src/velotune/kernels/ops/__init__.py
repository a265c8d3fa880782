"""Triton implementations, one module per op: its kernels and a `torch.autograd.Function` with a
hand-written backward. They import Triton at import time, so `velotune.kernels` imports them only
when a call takes the Triton path. (They live in this subpackage, not next to `velotune.kernels`'
functions, because importing a submodule binds its name on the parent package: a module
`velotune/kernels/rms_norm.py` would replace the function `velotune.kernels.rms_norm`.)"""
