"""Build a `Transformer` from a `Checkpoint`: allocate once, then copy tensors in as they stream.

The model is created on the meta device (no memory), materialised empty on the target device in
the target dtype, and every streamed tensor is checked (name, shape) and copied into its slot
before the next is read, so peak host memory stays near one copy of the model.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from velotune.errors import LoadError
from velotune.loaders.checkpoint import Checkpoint
from velotune.loaders.expert_tensors import ExpertTensors
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.models.vision_families import to_ours
from velotune.quant.policy import FourBitPolicy

# Tensors some checkpoints carry that the model derives itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def split_fused(name: str, tensor: torch.Tensor, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Phi-3 stores q/k/v and gate/up fused; the model keeps them apart so LoRA, kernels and the
    other families share one code path. Exports fuse them again."""
    if ".qkv_proj." in name:
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        if tensor.shape[0] != q + 2 * kv:
            raise LoadError(f"tensor {name!r} has {tensor.shape[0]} rows, expected {q + 2 * kv} (q+k+v)")
        for part, chunk in zip("qkv", tensor.split([q, kv, kv], dim=0)):
            yield name.replace(".qkv_proj.", f".{part}_proj."), chunk
    elif ".gate_up_proj." in name:
        i = config.intermediate_size
        if tensor.shape[0] != 2 * i:
            raise LoadError(f"tensor {name!r} has {tensor.shape[0]} rows, expected {2 * i} (gate+up)")
        gate, up = tensor.split([i, i], dim=0)
        yield name.replace(".gate_up_proj.", ".gate_proj."), gate
        yield name.replace(".gate_up_proj.", ".up_proj."), up
    else:
        yield name, tensor


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device | str,
                four_bit: FourBitPolicy | None = None) -> Transformer:
    """With `four_bit` (or a pre-quantized checkpoint) linear weights become 4-bit as they stream
    in (loaders/four_bit.py) and `model.quant_report` says what was quantized and kept."""
    config = ckpt.config
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype)
    stream = None
    if four_bit is not None or ckpt.prequantized:
        from velotune.loaders.four_bit import FourBitStream

        stream = FourBitStream(model, source=ckpt.source, dtype=dtype, device=device, policy=four_bit,
                               prequantized=ckpt.prequantized)
    model = model.to_empty(device=device)
    model.tie_weights()
    slots = dict(model.named_parameters(remove_duplicate=False))
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    filled: dict[str, int] = {}     # elements written into each parameter (experts arrive in pieces)
    experts = ExpertTensors(config, ckpt.source)
    for raw_name, tensor in ckpt.tensors():
        if raw_name.endswith(IGNORED_SUFFIXES):
            continue
        ours, transposed = to_ours(raw_name)     # vision-language checkpoints nest the decoder
        for name, part in split_fused(ours, tensor.t() if transposed else tensor, config):
            if name == tied:
                continue  # the head is the embedding; a copy in the file adds nothing
            for piece in experts.pieces(name, part):
                if stream is not None and stream.take(piece.name, piece.tensor, piece.index):
                    continue
                slot = slots.get(piece.name)
                if slot is None:
                    raise LoadError(f"{ckpt.source}: unexpected tensor {raw_name!r} for a {config.model_type} model")
                target = slot if piece.index is None else slot[piece.index]
                if tuple(piece.tensor.shape) != tuple(target.shape):
                    raise LoadError(f"{ckpt.source}: tensor {raw_name!r} has shape {tuple(piece.tensor.shape)}, "
                                    f"expected {tuple(target.shape)} from the config")
                with torch.no_grad():
                    target.copy_(piece.tensor)
                filled[piece.name] = filled.get(piece.name, 0) + target.numel()
    unpaired = experts.finish()
    if unpaired:
        raise LoadError(f"{ckpt.source}: MXFP4 tensors without their blocks/scales partner: {', '.join(unpaired)}")
    complete = {name for name, count in filled.items() if count >= slots[name].numel()}
    missing = sorted(set(slots) - complete - ({tied} if tied else set()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoadError(f"{ckpt.source}: missing tensors {shown}")
    if stream is not None:
        model.quant_report = stream.finish()
    return model
