"""A dispatch mode that counts how many tensors of a given shape have their own memory at once.

Peak memory is a property CPU tests can still check: an op sequence that keeps a temporary alive
while it makes the next one (a loop variable holding the last chunk, the last dequantized weight)
shows up as two storages of that shape alive together."""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveStorages(TorchDispatchMode):
    """The most storages of floating-point tensors of a shape `shape_matches` accepts alive at the
    same time.
    A storage lives while any tensor on it does, so views and `out=` results count with the buffer
    they use; storages listed in `ignore` (the inputs) are not counted."""

    def __init__(self, shape_matches: Callable[[torch.Size], bool], ignore: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.shape_matches = shape_matches
        self.ignored = {t.untyped_storage().data_ptr() for t in ignore}
        self.tensors: dict[int, int] = {}
        self.most = 0

    def _gone(self, storage: int) -> None:
        self.tensors[storage] -= 1
        if not self.tensors[storage]:
            del self.tensors[storage]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and self.shape_matches(t.shape)) \
                    or t.device.type == "meta":    # meta tensors hold no memory
                continue
            storage = t.untyped_storage().data_ptr()
            if storage in self.ignored:
                continue
            self.tensors[storage] = self.tensors.get(storage, 0) + 1
            self.most = max(self.most, len(self.tensors))
            weakref.finalize(t, self._gone, storage)
        return out


class LiveBytes(TorchDispatchMode):
    """The most bytes that storages made by ops inside the mode hold at once (any dtype): a CPU
    stand-in for the peak of what a piece of code allocates on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, list[int]] = {}     # data pointer -> [tensors on it, bytes]
        self.now = 0
        self.most = 0

    def _gone(self, storage: int) -> None:
        entry = self.storages[storage]
        entry[0] -= 1
        if not entry[0]:
            self.now -= entry[1]
            del self.storages[storage]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or not t.untyped_storage().nbytes():
                continue
            storage = t.untyped_storage().data_ptr()
            if storage in self.storages:
                self.storages[storage][0] += 1
            else:
                self.storages[storage] = [1, t.untyped_storage().nbytes()]
                self.now += t.untyped_storage().nbytes()
                self.most = max(self.most, self.now)
            weakref.finalize(t, self._gone, storage)
        return out
