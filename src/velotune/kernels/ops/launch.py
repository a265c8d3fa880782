"""Small helpers shared by the kernel launchers: device scoping, grid sizing and input checks."""
from __future__ import annotations

import contextlib
import functools

import torch


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's (multi-GPU safety)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Programs for a kernel that loops over its work items (each keeps a private partial sum):
    `per_sm` per SM on a GPU; few under the CPU interpreter, where every program runs in Python."""
    if device.type == "cuda":
        limit = per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        limit = 4
    return max(1, min(work_items, limit))


def rows_of(x: torch.Tensor, name: str) -> torch.Tensor:
    """`x` as a 2-D [rows, last dim] tensor whose last dim is contiguous (a view when possible)."""
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least 1 dimension, got a scalar")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int, where: str) -> None:
    """Every label is a token id of the vocabulary or ignore_index (one host sync on a GPU)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"{where}: label {first} is outside the vocabulary [0, {vocab}) "
                         f"and is not ignore_index={ignore_index}")


MAX_ROW_BLOCK = 65536


def row_block(n_cols: int, what: str) -> tuple[int, int]:
    """(BLOCK, num_warps) for kernels that hold one whole row of `n_cols` elements in registers."""
    import triton

    block = triton.next_power_of_2(n_cols)
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"{what}: last dimension {n_cols} is above the kernel limit of {MAX_ROW_BLOCK}")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps
