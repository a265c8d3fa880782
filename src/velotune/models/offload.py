"""Checkpointed decoder-layer inputs parked in host memory between the forward and the backward.

With checkpointing at decoder-layer boundaries, what a layer keeps on the GPU until its backward
is its input, [batch, seq, hidden]: for Llama-3.1-8B at 350,000 tokens that is 2.7 GiB per layer,
86 GiB for the 32 layers. `LayerInputOffloader` copies each such input to pinned host memory on a
side CUDA stream as soon as it is saved (the copy overlaps the next layers' compute), and in the
backward brings layer i-1's input back on the same side stream while layer i is recomputed, so at
most two layer inputs are on the GPU at any time. (A layer checkpointed in pieces, see
`velotune.placement`, parks each piece's inputs: q, k and v go and come back together
as one checkpoint's group; a layer keeping its attention output, `models/kept_attention.py`,
parks it into its input's group with `park`; "layer input" below covers them all. Which layers
park at all, and which stay on the GPU, is the placement plan's choice.)

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
On the CPU there are no streams: inputs are copied into plain CPU tensors and handed back as
fresh copies, which runs the same bookkeeping (and the tests) without a GPU.

Host memory (`PinnedHostPool`, owned by the model, so it outlives each forward):
- exact sizes. `torch.empty(..., pin_memory=True)` goes through torch's caching host allocator,
  which rounds every block up to a power of two (`CachingHostAllocator.h`, "Round up the
  allocation to the nearest power of two"; the process-wide `pinned_max_round_threshold`
  setting that 2.13 reads is newer than what we can count on in 2.11): a 2.67 GiB layer input
  at 350,000 tokens took a 4 GiB block, 128 GiB for 32 layers on a 125 GiB host. So each
  buffer is an ordinary CPU tensor page-locked with `cudaHostRegister` (through
  `torch.cuda.cudart()`, as torch's own distributed state-dict staging does in
  `torch/cuda/_pin_memory_utils.py`), exactly as large as the input, and unregistered (after the
  device has finished any copy still queued on it) before its memory is freed.
- reuse. Pinning is slow (the pages are faulted in and locked), so buffers are allocated in the
  first step and reused: each offloaded input leases the smallest free buffer that holds it and
  gives it back when autograd frees the saved input (the backward has run, or the graph died).
  Two graphs alive at once lease different buffers, so one never overwrites the other. The
  copies into and out of a buffer all run on the one side stream, so a reuse is ordered after
  the previous step's restore without further waiting.
- CUDA graphs (train/graphed_step.py). A captured step's copies are replayed into the same
  buffers every time, so the step records which buffers its capture leased and holds them for the
  graph's lifetime; the copies, events and stream waits here are all capturable (the side stream
  joins the capture through its wait on the compute stream and leaves it through the events the
  compute stream waits on). `OffloadStats` then describe the captured step.
- shape changes. When no free buffer is large enough, the free ones (all too small) are
  released before new ones are allocated, so a longer sequence does not pay for both sizes.
  Free buffers go when the model does, or with `PinnedHostPool.release_free()`.
- refusal. Pinned pages cannot be swapped or reclaimed, and a host that overcommits them gets
  the process killed without a word (most likely what ended the first 350,000-token run). Before allocating,
  the offloader checks that the inputs still to come in this forward fit in MemAvailable less
  `host_reserve_bytes` (4 GiB, a tenth of a small host), and raises `OffloadError` naming the sizes and what to change.
"""
from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

GIB = 2**30
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# Host memory left unpinned for the rest of this process (CUDA context, Python, data loading)
# and the system when deciding whether the offloaded inputs fit (a tenth of a small host).
HOST_RESERVE_BYTES = 4 * GIB
_CUDA_HOST_REGISTER_PORTABLE = 1   # pinned for every CUDA context, like torch's own registrations


class OffloadError(MemoryError):
    """Host memory for an offloaded checkpoint could not be had (names sizes and what to change)."""


def host_memory_bytes() -> tuple[int, int]:
    """(total, available) host memory in bytes; available is /proc/meminfo's MemAvailable (what
    can be had without swapping), the total where that file does not exist."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return total, int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, total


def host_reserve_bytes(total: int) -> int:
    """What the offload leaves unpinned on a host of `total` bytes."""
    return min(HOST_RESERVE_BYTES, total // 10)


def host_room_bytes() -> int:
    """Host memory that new offload buffers may take: MemAvailable beyond the reserve (may be < 0)."""
    total, available = host_memory_bytes()
    return available - host_reserve_bytes(total)


def host_memory_gib() -> tuple[float, float]:
    """(total, available) host memory in GiB (see `host_memory_bytes`)."""
    total, available = host_memory_bytes()
    return total / GIB, available / GIB


class HostBuffer:
    """One block of host memory of exactly `nbytes` (page-locked when `pinned`), holding one
    offloaded layer input at a time. `capturable`: pinned by torch's allocator instead (a CUDA
    graph may copy from it; see `PinnedHostPool.capturable`)."""

    __slots__ = ("nbytes", "in_use", "graph_held", "_memory", "_registered", "_torch_pinned")

    def __init__(self, nbytes: int, pinned: bool, capturable: bool = False) -> None:
        self.nbytes = nbytes
        self.in_use = False
        self.graph_held = False     # copied into by captured graphs' replays (PinnedHostPool.hold)
        self._registered: int | None = None
        self._torch_pinned = pinned and capturable
        if not pinned or capturable:
            self._memory = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._torch_pinned)
            return
        # Register whole pages that belong to this tensor alone: a page shared with another
        # allocation could already be registered, and the driver refuses overlapping ranges.
        span = -(-nbytes // PAGE_BYTES) * PAGE_BYTES
        raw = torch.empty(span + PAGE_BYTES, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE_BYTES
        self._memory = raw[start:start + span]     # a view: keeps `raw` alive
        # Fault the pages in first, one byte per page on torch's CPU threads, as torch's own
        # cudaHostRegister path does to cut the wall time; the driver would fault them serially.
        self._memory[::PAGE_BYTES].zero_()
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self._memory.data_ptr(), span, _CUDA_HOST_REGISTER_PORTABLE)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {span} bytes failed: {cudart.cudaGetErrorString(err)}")
        self._registered = self._memory.data_ptr()

    @property
    def pinned(self) -> bool:
        return self._registered is not None or self._torch_pinned

    def view(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The first bytes of the buffer as a contiguous tensor of this shape and dtype."""
        used = math.prod(shape) * dtype.itemsize
        if used > self.nbytes:
            raise ValueError(f"a {list(shape)} {dtype} tensor ({used} bytes) does not fit a {self.nbytes}-byte buffer")
        return self._memory[:used].view(dtype).view(shape)

    def release(self) -> None:
        """Unregister the pages (before the memory can be freed and handed out again). Waits
        for the device first: the last restore's copy out of this buffer may still be queued
        (rare: only when shapes grow, `release_free` is called or the model goes)."""
        if self._registered is not None:
            ptr, self._registered = self._registered, None
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(ptr)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:   # interpreter shutdown: the CUDA runtime may already be gone
            pass


class PinnedHostPool:
    """The host buffers of a model's offloaded checkpoints, kept from step to step (see the module
    docstring). Thread-safe: autograd gives buffers back from its own device threads."""

    def __init__(self) -> None:
        self.buffers: list[HostBuffer] = []
        self._lock = threading.Lock()
        self._logs: list[list[HostBuffer]] = []
        # A CUDA-graph capture copies only from host memory torch's own allocator pinned (torch
        # 2.11 does not count cudaHostRegister'd pages as pinned and refuses the copy), so a
        # pool serving a graphed step allocates there: sizes round up to a power of two, which
        # the short sequences graphs serve mostly are already (2 x 2,048 x 4,096 bf16 = 32 MiB).
        self.capturable = False
        # The most tokens a forward will park (set by a graphed step that knows its largest
        # micro-batch): new buffers are then sized for it, so a wider shape later in the run finds
        # buffers that fit instead of pinning new ones (`LayerInputOffloader._host_buffer`).
        self.max_tokens: int | None = None

    @contextmanager
    def recording(self) -> Iterator[list[HostBuffer]]:
        """Collects every buffer leased inside the block, where the buffers graphs hold may be
        leased too (`take`). The caller promises that the forwards begun in the block have run
        their backward before any graph replays (a graphed step's warm-up, capture or eager
        micro-batch). A CUDA graph captured there copies into the buffers it leased on every
        replay, so its owner then `hold`s them for as long as it lives."""
        log: list[HostBuffer] = []
        with self._lock:
            self._logs.append(log)
        try:
            yield log
        finally:
            with self._lock:
                self._logs.remove(log)

    def hold(self, buffers: list[HostBuffer]) -> None:
        """Lease `buffers` to captured graphs for as long as they live: no step outside a
        `recording` leases or releases them. Inside one, another capture or an eager micro-batch
        of the graphed step may lease them too: graphs replay one at a time, each writing its
        offloaded inputs in its forward before its backward reads them, and the eager steps run
        their backward before the next replay, so graphs of several micro-batch shapes and their
        warm-ups share one set of host buffers instead of one set per shape."""
        with self._lock:
            for buffer in buffers:
                buffer.in_use = buffer.graph_held = True

    @property
    def held_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def take(self, nbytes: int) -> HostBuffer | None:
        """Lease the smallest free buffer of at least `nbytes` (inside a `recording`, also one
        that graphs hold and the recording has not leased yet), or None."""
        with self._lock:
            def free(b: HostBuffer) -> bool:
                if not b.in_use:
                    return True
                return b.graph_held and bool(self._logs) and not any(b is x for log in self._logs for x in log)
            fits = [b for b in self.buffers if b.nbytes >= nbytes and free(b)]
            if not fits:
                return None
            buffer = min(fits, key=lambda b: b.nbytes)
            buffer.in_use = True
            for log in self._logs:
                log.append(buffer)
            return buffer

    def allocate(self, nbytes: int, pinned: bool) -> HostBuffer:
        """A new leased buffer of exactly `nbytes` (RuntimeError when the memory cannot be had)."""
        buffer = HostBuffer(nbytes, pinned, capturable=self.capturable)
        buffer.in_use = True
        with self._lock:
            self.buffers.append(buffer)
            for log in self._logs:
                log.append(buffer)
        return buffer

    def give_back(self, buffer: HostBuffer) -> None:
        with self._lock:
            buffer.in_use = buffer.graph_held

    def release_free(self) -> int:
        """Free every buffer not leased; returns the bytes released."""
        with self._lock:
            free = [b for b in self.buffers if not b.in_use]
            self.buffers = [b for b in self.buffers if b.in_use]
        for buffer in free:
            buffer.release()
        return sum(b.nbytes for b in free)

    def __reduce__(self):
        """Copies and pickles of a model start with an empty pool (buffers are per process)."""
        return (PinnedHostPool, ())


class _Parked:
    """One checkpoint input: its leased host buffer and, once prefetched, the device copy and its
    ready event. `group` is the checkpoint it belongs to (inputs parked in one `saving` block).
    The buffer goes back to the pool when autograd drops this object."""

    __slots__ = ("group", "host", "device_copy", "ready", "restored", "__weakref__")

    def __init__(self, group: int, host: torch.Tensor) -> None:
        self.group = group
        self.host = host
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.restored = False


@dataclass
class OffloadStats:
    """What one forward/backward moved. Kept apart from the offloader, which the autograd graph
    owns (and frees with it): holding the offloader would keep its host buffers leased."""

    offloaded: int = 0          # layer inputs copied to host memory
    offloaded_bytes: int = 0
    prefetched: int = 0         # copies brought back to the device
    restored: int = 0           # copies handed to the backward
    reused: int = 0             # host buffers leased from the pool
    allocated: int = 0          # host buffers allocated (and pinned) in this forward
    allocated_bytes: int = 0
    allocation_seconds: float = 0.0


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per GPU, reused across steps (creating streams per step leaks handles)."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class LayerInputOffloader:
    """Parks the checkpointed input of each decoder layer of one forward pass in host memory.

    Use one per forward pass: `with offloader.saving(x): x = checkpoint(layer, x, ...)` for each
    checkpointed layer, in order. `pool` holds the host buffers across forwards (a fresh one when
    not given); `planned` is how many inputs this forward will offload and `planned_bytes` their
    bytes (`velotune.placement`; without it, `planned` inputs as large as the one at hand), so
    that missing host memory is reported before the first of them is copied. `stats` counts what
    moved."""

    def __init__(self, device: torch.device, stats: OffloadStats | None = None,
                 pool: PinnedHostPool | None = None, planned: int = 0, planned_bytes: int = 0) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = side_stream(self.device) if self.cuda else None
        self.pool = pool if pool is not None else PinnedHostPool()
        self.planned = planned
        self.planned_bytes = planned_bytes
        self.groups: list[list[_Parked]] = []   # per checkpoint (`saving` block), in forward order
        self.stats = stats if stats is not None else OffloadStats()

    @contextmanager
    def saving(self, *inputs: torch.Tensor) -> Iterator[None]:
        """Within this block, `inputs` saved for backward go to host memory, as one group that the
        backward brings back together; every other saved tensor (cos/sin tables shared by all
        layers, masks) is left where it is."""

        # The hooks outlive this block (autograd keeps them with every tensor they packed), so
        # they must not close over the inputs themselves: that would keep the GPU copies alive
        # until the backward and undo the offload. They hold their identities instead (the caller
        # keeps the inputs alive for the whole block, so their addresses cannot be reused meanwhile).
        identities = {_identity(t) for t in inputs}
        self.groups.append([])
        group = len(self.groups) - 1

        def pack(tensor: torch.Tensor):
            if _identity(tensor) in identities:
                return self._offload(tensor, group)
            return tensor

        def unpack(packed):
            return self._restore(packed) if isinstance(packed, _Parked) else packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def park(self, tensor: torch.Tensor) -> _Parked:
        """Park `tensor` with the checkpoint being saved now (inside its `saving` block), outside
        autograd's saved tensors: it comes back with that checkpoint's inputs (`fetch`). For
        what a layer keeps besides its input (`models/kept_attention.py`)."""
        return self._offload(tensor, len(self.groups) - 1)

    def fetch(self, parked: _Parked) -> torch.Tensor:
        """The device copy of a tensor parked with `park` (prefetched with its checkpoint's inputs)."""
        return self._restore(parked)

    def _offload(self, tensor: torch.Tensor, group: int) -> _Parked:
        buffer = self._host_buffer(tensor, self.stats.offloaded)
        host = buffer.view(tensor.shape, tensor.dtype)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)
        else:
            host.copy_(tensor)
        parked = _Parked(group, host)
        weakref.finalize(parked, self.pool.give_back, buffer)
        self.groups[group].append(parked)
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += tensor.numel() * tensor.element_size()
        return parked

    def _host_buffer(self, tensor: torch.Tensor, index: int) -> HostBuffer:
        """A pooled buffer when a free one holds `tensor`; otherwise a new one, once the free (too
        small) buffers are released and the host is known to have room: sized for the pool's
        `max_tokens` rows of this tensor's width where the host has room for that, else exact."""
        nbytes = tensor.numel() * tensor.element_size()
        buffer = self.pool.take(nbytes)
        if buffer is not None:
            self.stats.reused += 1
            return buffer
        self.pool.release_free()
        remaining = max(self.planned - index, 1)
        room = host_room_bytes()
        still = self.planned_bytes - self.stats.offloaded_bytes if self.planned_bytes else remaining * nbytes
        if max(still, nbytes) > room:
            raise self._no_room_error(tensor, index, remaining)
        size = nbytes
        if self.pool.max_tokens and tensor.dim() > 0:
            largest = self.pool.max_tokens * tensor.shape[-1] * tensor.element_size()
            if largest > nbytes and max(still, nbytes) * largest // nbytes <= room:
                size = largest
        start = time.perf_counter()
        try:
            buffer = self.pool.allocate(size, pinned=self.cuda)
        except RuntimeError as exc:
            raise self._host_memory_error(tensor, index, exc) from exc
        self.stats.allocated += 1
        self.stats.allocated_bytes += size
        self.stats.allocation_seconds += time.perf_counter() - start
        return buffer

    def _prefetch(self, parked: _Parked) -> None:
        if parked.device_copy is not None or parked.restored:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                parked.device_copy = parked.host.to(self.device, non_blocking=True)
                parked.ready = torch.cuda.Event()
                parked.ready.record(self.stream)
        else:
            parked.device_copy = parked.host.clone()   # the buffer stays the pool's, as on CUDA
        self.stats.prefetched += 1

    def _prefetch_group(self, group: int) -> None:
        for parked in self.groups[group]:
            self._prefetch(parked)

    def _restore(self, parked: _Parked) -> torch.Tensor:
        self._prefetch_group(parked.group)   # no-op for what the next checkpoint's backward asked for
        tensor = parked.device_copy
        parked.device_copy, parked.restored = None, True   # the recomputation holds it from here
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(parked.ready)
            tensor.record_stream(compute)
        if parked.group > 0:         # the backward reaches the checkpoint before this one next
            self._prefetch_group(parked.group - 1)
        self.stats.restored += 1
        return tensor

    def _no_room_error(self, tensor: torch.Tensor, index: int, remaining: int) -> OffloadError:
        nbytes = tensor.numel() * tensor.element_size()
        total, available = host_memory_bytes()
        reserve = host_reserve_bytes(total)
        room = max(available - reserve, 0)
        keep = min(math.ceil((remaining * nbytes - room) / nbytes), remaining)
        return OffloadError(
            f"offloading the checkpointed inputs of decoder layers {index}..{index + remaining - 1} "
            f"({remaining} x {list(tensor.shape)} {tensor.dtype}, {nbytes / GIB:.2f} GiB each, "
            f"{remaining * nbytes / GIB:.1f} GiB) needs that much pinned host memory, but the host has "
            f"{available / GIB:.1f} GiB available of {total / GIB:.1f} GiB (MemAvailable; "
            f"{reserve / GIB:.1f} GiB of it is left to the rest of the process and the system), "
            f"and {self.pool.held_bytes / GIB:.1f} GiB of offload buffers are already held. Keep {keep} more "
            f"of the last checkpoints on the GPU (raise checkpoints_kept_on_gpu by {keep}, "
            f"{nbytes / GIB:.2f} GiB of GPU memory each), shorten the sequence, or turn "
            f"offload_checkpoints off")

    def _host_memory_error(self, tensor: torch.Tensor, index: int, exc: Exception) -> OffloadError:
        total, available = host_memory_gib()
        size = tensor.numel() * tensor.element_size() / GIB
        return OffloadError(
            f"offloading checkpointed input {index} ({list(tensor.shape)} "
            f"{tensor.dtype}, {size:.2f} GiB) to pinned host memory failed after "
            f"{self.stats.offloaded_bytes / GIB:.1f} GiB were already offloaded; the host has "
            f"{total:.1f} GiB, {available:.1f} GiB available. Raise checkpoints_kept_on_gpu, shorten "
            f"the sequence, or turn offload_checkpoints off ({type(exc).__name__}: {exc})")


def _identity(t: torch.Tensor) -> tuple:
    """What makes two tensor objects the same data: device, address, shape, strides, dtype."""
    return t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype
