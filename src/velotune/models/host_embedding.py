"""Frozen input embeddings kept in host memory: a training step copies only its tokens' rows.

Why: under LoRA/QLoRA the input embedding is frozen, and an untied model's table is used for
nothing but a row lookup. Llama-3.1-8B's is 128,256 x 4,096 bf16 = 0.98 GiB of GPU memory, while
one step of 4,096 tokens reads 32 MiB of it. `HostEmbedding` keeps the table in host memory,
gathers the rows of the step's ids on the CPU into a pinned buffer and copies that [B, T, H]
block to the GPU without blocking the host.

Where it may not apply (`offload_refusal`): a head tied to the embedding (Gemma, SmolLM2, small
Qwen) reads the whole matrix every step; an embedding that trains (full fine-tuning, a LoRA
adapter on `embed_tokens`) needs its gradient on the device. `put_on_host(model, True)` refuses
those with the reason; `"auto"` leaves them where they are, and also stays off unless the model
computes on a CUDA device (on the CPU there is nothing to save).

What stays the same, and what does not:
- The table is still the frozen Parameter `model.embed_tokens.weight`, so `state_dict`,
  `load_state_dict`, exports, merges and `get_parameter` read and write it unchanged.
- `model.to(device)` / `.cuda()` / `.cpu()` do not move the table: they change where the rows
  are delivered (the `device` attribute). Dtype conversions (`.to(torch.float16)`, `.half()`)
  convert the host table. `put_on_device` brings the table back as an ordinary nn.Embedding.
- The module is moved to the end of the decoder's children, so `next(model.parameters())`,
  which callers across the package read as "the model's device", names a weight on the device.
- DDP is told to ignore the host table (it refuses a module whose parameters sit on two kinds
  of device, and a frozen table has nothing to synchronise).
- Ids given on the GPU are copied to the host first (a sync). The trainer has every batch on
  the CPU before moving it, so it hands the CPU copy over with `stage_host_ids` and the lookup
  needs no sync. Generation feeds GPU ids (sampled tokens), so each decode step syncs once;
  the static decoder (infer/static.py) does the lookup eagerly and replays its CUDA graph from
  the delivered rows, because a graph cannot capture a host gather.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from velotune.lora.layers import LoraLayer

EMBEDDING_NAME = "model.embed_tokens.weight"


class EmbeddingOffloadError(ValueError):
    """Embeddings that cannot live in host memory; the message says why."""


class HostEmbedding(nn.Module):
    """An embedding lookup whose frozen table lives in host memory and whose rows are delivered to
    `device`. `weight` keeps nn.Embedding's name, shape and dtype."""

    # Its lookup is a host gather, which a CUDA graph cannot hold: graphed steps (the decode step
    # of infer/static.py, which sits below models/ and so asks this flag rather than the class)
    # look rows up before each replay.
    gathers_on_host = True

    def __init__(self, weight: torch.Tensor, device: torch.device | str) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"HostEmbedding: weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().to("cpu"), requires_grad=False)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.device = torch.device(device)
        # (device ids, their host copy) handed over by `stage_host_ids`; weak so a stale batch
        # cannot keep GPU memory alive, and matched by identity so a different tensor is never
        # mistaken for it.
        self._staged: tuple[weakref.ref[torch.Tensor], torch.Tensor] | None = None

    def stage_host_ids(self, device_ids: torch.Tensor, host_ids: torch.Tensor) -> None:
        """Promise that `host_ids` (CPU) holds the values of `device_ids`: a forward given exactly
        `device_ids` reads `host_ids` and skips the device-to-host copy (and its sync). The
        caller must not change `device_ids` in place afterwards."""
        if host_ids.device.type != "cpu" or host_ids.shape != device_ids.shape:
            raise ValueError(f"stage_host_ids: host_ids must be a CPU tensor shaped like the ids "
                             f"{tuple(device_ids.shape)}, got {tuple(host_ids.shape)} on {host_ids.device}")
        self._staged = (weakref.ref(device_ids), host_ids)

    def host_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids` on the CPU: as given, the staged copy, or copied (which waits for the device)."""
        if ids.device.type == "cpu":
            return ids
        if self._staged is not None and self._staged[0]() is ids:
            return self._staged[1]
        return ids.to("cpu")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise EmbeddingOffloadError(f"{EMBEDDING_NAME}: requires grad, but the table lives in host memory "
                                        "and is looked up without autograd; call put_embeddings_on_device() "
                                        "before training it")
        host = self.host_ids(ids)
        # For a GPU, pinned rows from torch's caching host allocator: the non-blocking copy records
        # its stream on the block, which is not handed out again before the copy has read it.
        # Delivered to the CPU, `.to` returns the gathered rows themselves.
        rows = torch.empty(host.numel(), self.embedding_dim, dtype=self.weight.dtype,
                           pin_memory=self.device.type == "cuda")
        torch.index_select(self.weight, 0, host.reshape(-1), out=rows)
        return rows.to(self.device, non_blocking=True).view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (torch's signature)
        """`.to()`, `.cuda()`, `.half()`...: learn the target device and dtype from an empty probe
        (so a 1 GiB table never lands on the GPU in passing); convert the table's dtype on the host
        and deliver rows to the target device."""
        probe = fn(torch.empty(0, dtype=self.weight.dtype))
        if probe.dtype != self.weight.dtype:
            self.weight = nn.Parameter(self.weight.detach().to(probe.dtype), requires_grad=False)
        self.device = probe.device
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host table, rows to {self.device}"


def offload_refusal(model: nn.Module) -> str | None:
    """Why `model`'s input embeddings cannot live in host memory, or None when they can."""
    embed = model.model.embed_tokens
    if isinstance(embed, HostEmbedding):
        return None
    if isinstance(embed, LoraLayer):
        return ("model.embed_tokens carries a LoRA adapter (target_modules includes embed_tokens), so its rows "
                "train on the device")
    if not isinstance(embed, nn.Embedding) or embed.max_norm is not None:
        return f"model.embed_tokens is a {type(embed).__name__} that is not a plain lookup table"
    head = getattr(model.lm_head, "base_layer", model.lm_head)   # a LoRA head: its frozen base, not base + BA
    if model.config.tie_word_embeddings or same_storage(head.weight, embed.weight):
        return ("the output head shares the embedding matrix (tie_word_embeddings), and the head needs the "
                "whole matrix on the device every step")
    if embed.weight.requires_grad:
        return (f"{EMBEDDING_NAME} is trainable (full fine-tuning, or embed_tokens in modules_to_save), and "
                "its gradient is computed on the device")
    return None


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def parse_mode(value: object, where: str) -> bool | str:
    """true | false | "auto", or a ValueError naming `where`."""
    if isinstance(value, bool) or value == "auto":
        return value  # type: ignore[return-value]
    raise ValueError(f"{where} must be true, false or auto, got {value!r}")


def compute_device(model: nn.Module) -> torch.device:
    """The device the model computes on: that of its decoder layers (never the host table)."""
    return next(model.model.layers.parameters()).device


def put_on_host(model: nn.Module, mode: bool | str = True, where: str = "offload_embeddings") -> bool:
    """Move the input embedding table to host memory as `mode` says; True when it is there after.

    mode True refuses (EmbeddingOffloadError naming `where` and the reason) embeddings that must
    stay on the device; "auto" leaves those, and any model not on a CUDA device, as they are;
    False brings an offloaded table back (`put_on_device`)."""
    mode = parse_mode(mode, where)
    if mode is False:
        put_on_device(model)
        return False
    embed = model.model.embed_tokens
    if isinstance(embed, HostEmbedding):
        return True
    reason = offload_refusal(model)
    device = compute_device(model)
    if mode == "auto" and (reason is not None or device.type != "cuda"):
        return False
    if reason is not None:
        raise EmbeddingOffloadError(f"{where}: the input embeddings cannot live in host memory: {reason}")
    host = HostEmbedding(embed.weight, device)
    _replace_embedding(model, host)
    _ignored_by_ddp(model, add=True)
    return True


def put_on_device(model: nn.Module) -> None:
    """Bring an offloaded table back as a frozen nn.Embedding on the compute device (no-op if it
    was never offloaded)."""
    embed = model.model.embed_tokens
    if not isinstance(embed, HostEmbedding):
        return
    weight = embed.weight.detach().to(embed.device)
    plain = nn.Embedding(embed.num_embeddings, embed.embedding_dim, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    _replace_embedding(model, plain)
    _ignored_by_ddp(model, add=False)


def on_host(model: nn.Module) -> bool:
    return isinstance(model.model.embed_tokens, HostEmbedding)


def stage_host_ids(model: nn.Module, device_ids: torch.Tensor, host_ids: torch.Tensor) -> None:
    """Hand the CPU copy of a batch's ids to an offloaded embedding (no-op otherwise); see
    `HostEmbedding.stage_host_ids`."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(embed, HostEmbedding) and host_ids.device.type == "cpu":
        embed.stage_host_ids(device_ids, host_ids)


def _replace_embedding(model: nn.Module, module: nn.Module) -> None:
    """Swap `model.model.embed_tokens`, registered last among the decoder's children when it holds
    the host table and first (its original place) otherwise, so that the first parameter is on the
    compute device. Children are re-added through setattr, so only the order changes."""
    decoder = model.model
    others = {name: child for name, child in decoder.named_children() if name != "embed_tokens"}
    for name in [*others, "embed_tokens"]:
        delattr(decoder, name)
    if not isinstance(module, HostEmbedding):
        decoder.embed_tokens = module
    for name, child in others.items():
        setattr(decoder, name, child)
    if isinstance(module, HostEmbedding):
        decoder.embed_tokens = module


def _ignored_by_ddp(model: nn.Module, add: bool) -> None:
    """Keep DDP off the host table (DDP's documented hook for parameters it must not touch)."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = [n for n in getattr(model, "_ddp_params_and_buffers_to_ignore", []) if n != EMBEDDING_NAME]
    if add:
        ignored.append(EMBEDDING_NAME)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
