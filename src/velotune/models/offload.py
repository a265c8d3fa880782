"""Checkpointed decoder-layer inputs parked in host memory between the forward and the backward.

With checkpointing at decoder-layer boundaries, what a layer keeps on the GPU until its backward
is its input, [batch, seq, hidden]: for Llama-3.1-8B at 350,000 tokens that is 2.7 GiB per layer,
86 GiB for the 32 layers. `LayerInputOffloader` copies each such input to pinned host memory on a
side CUDA stream as soon as it is saved (the copy overlaps the next layers' compute), and in the
backward brings layer i-1's input back on the same side stream while layer i is recomputed, so at
most two layer inputs are on the GPU at any time.

Why saved-tensor hooks around `torch.utils.checkpoint` (non-reentrant) instead of a custom
autograd Function per layer: the non-reentrant checkpoint stores the layer's inputs through the
autograd saved-tensor machinery *outside* its own recomputation hooks, so hooks placed around the
call see exactly those inputs and nothing saved inside the layer (which the checkpoint discards
and recomputes). Torch's checkpoint keeps doing what it does well (RNG and autocast replay, early
stop, parameter gradients through the ordinary autograd graph, so `autograd.grad`, DDP and FSDP
hooks see nothing unusual); this module only moves bytes. A custom Function would have to redo
all of that and hand back parameter gradients itself. `tests/models/test_offload.py` checks that
the hooks do see the layer inputs, so a change in torch's checkpoint shows up as a failing test.

Stream discipline (CUDA):
- offload: the side stream waits for the compute stream (the input is complete), copies to pinned
  host memory, and the input is `record_stream`-ed on the side stream, so the caching allocator
  does not hand its memory out again before the copy has read it (the forward drops the input
  right after the layer).
- restore: the device copy is allocated and filled on the side stream (ordered after the host
  copy, same stream); the compute stream waits on an event recorded after it, and the tensor is
  `record_stream`-ed on the compute stream, so its memory is not reused while the recomputation
  still reads it.
On the CPU there are no streams: inputs are copied into plain CPU tensors and handed back, which
runs the same bookkeeping (and the tests) without a GPU.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

GIB = 2**30


class OffloadError(MemoryError):
    """Host memory for an offloaded checkpoint could not be had (names sizes and what to change)."""


class _Parked:
    """One layer input: its host copy and, once prefetched, the device copy and its ready event."""

    __slots__ = ("index", "host", "device_copy", "ready")

    def __init__(self, index: int, host: torch.Tensor) -> None:
        self.index = index
        self.host = host
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None


@dataclass
class OffloadStats:
    """What one forward/backward moved. Kept apart from the offloader, which the autograd graph
    owns (and frees with it): holding the offloader would keep its host copies alive."""

    offloaded: int = 0          # layer inputs copied to host memory
    offloaded_bytes: int = 0
    prefetched: int = 0         # copies brought back to the device
    restored: int = 0           # copies handed to the backward


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per GPU, reused across steps (creating streams per step leaks handles)."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def host_memory_gib() -> tuple[float, float]:
    """(total, available) host memory in GiB, from /proc/meminfo where it exists."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    available = total
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return total, available


class LayerInputOffloader:
    """Parks the checkpointed input of each decoder layer of one forward pass in host memory.

    Use one per forward pass: `with offloader.saving(x): x = checkpoint(layer, x, ...)` for each
    checkpointed layer, in order. `stats` counts what moved."""

    def __init__(self, device: torch.device, stats: OffloadStats | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = side_stream(self.device) if self.cuda else None
        self.parked: list[_Parked] = []
        self.stats = stats if stats is not None else OffloadStats()

    @contextmanager
    def saving(self, layer_input: torch.Tensor) -> Iterator[None]:
        """Within this block, `layer_input` saved for backward goes to host memory; every other
        saved tensor (cos/sin tables shared by all layers, masks) is left where it is."""

        # The hooks outlive this block (autograd keeps them with every tensor they packed), so
        # they must not close over `layer_input` itself: that would keep the GPU copy alive
        # until the backward and undo the offload. They hold its identity instead (the caller
        # keeps the input alive for the whole block, so its address cannot be reused meanwhile).
        identity = _identity(layer_input)

        def pack(tensor: torch.Tensor):
            if _identity(tensor) == identity:
                return self._offload(tensor)
            return tensor

        def unpack(packed):
            return self._restore(packed) if isinstance(packed, _Parked) else packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _offload(self, tensor: torch.Tensor) -> _Parked:
        index = len(self.parked)
        try:
            host = _host_empty(tensor.shape, tensor.dtype, self.cuda)
        except RuntimeError as exc:
            raise self._host_memory_error(tensor, index, exc) from exc
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)
        else:
            host.copy_(tensor)
        parked = _Parked(index, host)
        self.parked.append(parked)
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += tensor.numel() * tensor.element_size()
        return parked

    def _prefetch(self, parked: _Parked) -> None:
        if parked.device_copy is not None:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                parked.device_copy = parked.host.to(self.device, non_blocking=True)
                parked.ready = torch.cuda.Event()
                parked.ready.record(self.stream)
        else:
            parked.device_copy = parked.host
        self.stats.prefetched += 1

    def _restore(self, parked: _Parked) -> torch.Tensor:
        self._prefetch(parked)       # no-op when the previous layer's backward already asked
        tensor = parked.device_copy
        parked.device_copy = None    # the recomputation holds it from here; we must not
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(parked.ready)
            tensor.record_stream(compute)
        if parked.index > 0:         # the backward reaches the layer before this one next
            self._prefetch(self.parked[parked.index - 1])
        self.stats.restored += 1
        return tensor

    def _host_memory_error(self, tensor: torch.Tensor, index: int, exc: Exception) -> OffloadError:
        total, available = host_memory_gib()
        size = tensor.numel() * tensor.element_size() / GIB
        return OffloadError(
            f"offloading the checkpointed input of decoder layer {index} ({list(tensor.shape)} "
            f"{tensor.dtype}, {size:.2f} GiB) to pinned host memory failed after "
            f"{self.stats.offloaded_bytes / GIB:.1f} GiB were already offloaded; the host has "
            f"{total:.1f} GiB, {available:.1f} GiB available. Shorten the sequence, or turn "
            f"offload_checkpoints off ({type(exc).__name__}: {exc})")


def _host_empty(shape: torch.Size, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """Host memory for one layer input: pinned (page-locked) for asynchronous copies from CUDA,
    through torch's caching host allocator, which reuses the blocks from step to step."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pinned)


def _identity(t: torch.Tensor) -> tuple:
    """What makes two tensor objects the same data: device, address, shape, strides, dtype."""
    return t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype
