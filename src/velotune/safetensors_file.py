"""Writing .safetensors files with the permissions any other file gets.

safetensors' `save_file` (0.8) leaves its files mode 0600, readable by their owner alone, so a
merged model or adapter shared on a server, or served by another user's process (Ollama runs as
its own user), could not be read. Every safetensors file velotune writes goes through
`save_safetensors`, which sets the mode a plain `open(path, "w")` would give: 0666 less the
process's umask (0644 under the usual 022). The umask can only be read by setting it, so it is set
and restored at once.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def normal_mode() -> int:
    """0666 less the current umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, normal_mode())
