"""The random-number state of a forward, taken so that its recomputation draws the same numbers
(dropout masks): the tiled MLP's chunked backward (models/tiled_mlp.py) and a one-node layer
checkpoint's backward (models/layer_checkpoint.py) both replay one."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class RngStates:
    cpu: torch.Tensor
    cuda: torch.Tensor | None   # the state of the CUDA device the forward ran on, if it ran on one
    device: torch.device

    @classmethod
    def of(cls, device: torch.device) -> RngStates:
        """The current states, for a forward about to run on `device`."""
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None, device)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Within the block the states are these; after it, what they were before."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield
