"""Which implementation runs: the Triton kernels or the plain-PyTorch references.

Rules, checked on every call (they are cheap):
- Kernels run only on CUDA tensors, with Triton importable, while kernels are enabled.
- `VELOTUNE_KERNELS=0` in the environment (read at import) or `set_kernels_enabled(False)` turns
  them off everywhere, for debugging or for bisecting a numerical difference.
- `force_triton()` runs the kernels on CPU tensors too. That only works under Triton's
  interpreter (`TRITON_INTERPRET=1` set before the first kernel module is imported), which is how
  the kernel tests check the kernels on machines without a GPU. Kernel modules import Triton
  lazily, on the first call that needs them, so setting the variable in a test's conftest works.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

_enabled = os.environ.get("VELOTUNE_KERNELS", "1").strip().lower() not in {"0", "false", "no", "off"}
_forced = False


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (the `kernels` extra)."""
    return importlib.util.find_spec("triton") is not None


def set_kernels_enabled(flag: bool) -> None:
    """Turn the Triton kernels on or off for the whole process (overrides `VELOTUNE_KERNELS`)."""
    global _enabled
    _enabled = bool(flag)


def kernels_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def force_triton() -> Iterator[None]:
    """Run the Triton kernels whatever the tensors' device, inside this block (tests, under
    `TRITON_INTERPRET=1`). Raises if Triton is missing or kernels are disabled, because then the
    forced path cannot run and a test would silently check the reference against itself."""
    global _forced
    if not triton_available():
        raise RuntimeError("force_triton(): the `triton` package is not installed (pip install velotune[kernels])")
    if not _enabled:
        raise RuntimeError("force_triton(): kernels are disabled (VELOTUNE_KERNELS=0 or set_kernels_enabled(False))")
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def capturing(tensor: torch.Tensor) -> bool:
    """True while `tensor`'s CUDA stream is being captured into a graph (train/graphed_step.py).
    Code on the training path asks this before anything that waits for the GPU (`.item()`, a
    boolean test of a device tensor, boolean-mask indexing), which a capture does not allow."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a call on these tensors should take the Triton path."""
    if not _enabled or not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    if _forced and os.environ.get("TRITON_INTERPRET", "0") in ("0", ""):
        raise RuntimeError("force_triton(): tensors not on CUDA need Triton's interpreter; set TRITON_INTERPRET=1 "
                           "before the first kernel runs")
    return _forced
