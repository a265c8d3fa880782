"""A plain, whole copy of an FSDP-trained model on rank 0, for everything that happens after
training in one process: saving the HF folder, exports, answering sample prompts. Forward passes
of the sharded model need every rank in step, so these use the copy instead."""
from __future__ import annotations

import torch
from torch import nn

from velotune.distributed.sharded_checkpoint import full_state_on_rank0
from velotune.distributed.world import World


def gather_plain_model(model: nn.Module, world: World) -> nn.Module | None:
    """Rank 0: a CPU `Transformer` holding every weight of the sharded `model` (same config,
    generation settings and sequence limit); other ranks: None. Every rank must call it."""
    from velotune.models.transformer import Transformer

    state = full_state_on_rank0(model)
    if not world.is_main:
        return None
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain = plain.to_empty(device="cpu")
    plain.tie_weights()
    result = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"gathered FSDP state does not match the model: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    for name in ("generation_config", "max_seq_length"):
        if hasattr(model, name):
            setattr(plain, name, getattr(model, name))
    return plain
