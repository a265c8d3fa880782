"""Merged export in Hugging Face layout: a folder transformers, vLLM and our own loader open.

Writes, into one folder:
- model.safetensors, or model-0000i-of-0000n.safetensors shards of at most `max_shard_size`
  bytes plus model.safetensors.index.json (the weight map) when the model is larger;
- config.json: the one the model was loaded from (`ModelConfig.source`) with the dtype updated,
  or, for a model built from a config alone, one composed from the `ModelConfig` fields;
- generation_config.json (the model's, with its BOS/EOS ids);
- the tokenizer files (`Tokenizer.save`).
Weights come from `weights.plan_tensors`: adapters merged (per-expert ones too), a 4-bit base
dequantized first, Phi-3 re-fused, experts in the family's checkpoint layout (Qwen3-MoE per
expert, gpt-oss stacked and interleaved), no `lm_head` when it is tied to the embedding. A shard's tensors are computed just
before the shard is written, so memory holds one shard, not the model twice.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from velotune.export.errors import ExportError
from velotune.export.progress import track
from velotune.export.weights import PlannedTensor, export_config, plan_tensors
from velotune.models.config import ModelConfig
from velotune.models.families import FAMILIES
from velotune.models.vision_families import VISION_FAMILIES, to_hf
from velotune.models.transformer import Transformer
from velotune.safetensors_file import save_safetensors

HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
ARCHITECTURE_NAMES = {f.model_type: f.architecture for f in FAMILIES.values()}
DEFAULT_SHARD_BYTES = 5 * 1000**3
INDEX_FILE = "model.safetensors.index.json"
T = TypeVar("T")


def composed_config(c: ModelConfig) -> dict[str, Any]:
    """A config.json for a config that was not read from one."""
    cfg: dict[str, Any] = {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": c.hidden_act, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }
    if c.partial_rotary_factor != 1.0:
        cfg["partial_rotary_factor"] = c.partial_rotary_factor
    if c.model_type in ("llama", "qwen3", "qwen3_moe", "gemma3_text", "smollm3", "gpt_oss"):
        cfg["attention_bias"] = c.qkv_bias
    if c.model_type in ("llama", "smollm3"):
        cfg["mlp_bias"] = c.mlp_bias
    if c.no_rope_layers:
        cfg["no_rope_layers"] = list(c.no_rope_layers)
    if c.local_rope_theta is not None:
        cfg["rope_local_base_freq"] = c.local_rope_theta
    if c.sliding_window:
        cfg["sliding_window"] = c.sliding_window
        cfg["layer_types"] = list(c.layer_types)
        if c.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            cfg["use_sliding_window"] = True
    if c.model_type in ("gemma2", "gemma3_text"):
        cfg.update(hidden_activation=c.hidden_act, attn_logit_softcapping=c.attn_logit_softcapping,
                   final_logit_softcapping=c.final_logit_softcapping,
                   query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim)
    if c.num_experts:
        cfg.update(_experts_config(c))
    return cfg


def _experts_config(c: ModelConfig) -> dict[str, Any]:
    """The mixture-of-experts keys of a composed config.json (the load-balancing weight is
    written as transformers applies it: with output_router_logits)."""
    cfg: dict[str, Any] = {"num_experts_per_tok": c.num_experts_per_tok, "output_router_logits": c.router_aux_loss_coef > 0,
                           "router_aux_loss_coef": c.router_aux_loss_coef}
    if c.model_type == "qwen3_moe":
        cfg.update(num_experts=c.num_experts, moe_intermediate_size=c.moe_intermediate_size,
                   norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=[i for i, moe in enumerate(c.moe_layers) if not moe])
    else:   # gpt-oss: the experts' size is intermediate_size
        cfg.update(num_local_experts=c.num_experts, intermediate_size=c.moe_intermediate_size,
                   swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit)
    return cfg


def config_json(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    if config.multimodal_type is not None:
        return vision_language_config_json(config, dtype)
    cfg = dict(config.source) if config.source else composed_config(config)
    cfg["model_type"] = config.model_type
    cfg["architectures"] = [ARCHITECTURE_NAMES[config.model_type]]
    cfg["tie_word_embeddings"] = config.tie_word_embeddings
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = DTYPE_NAMES[dtype]
    return cfg


def vision_language_config_json(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json it was read from, the decoder's tie flag and the dtype updated."""
    cfg = dict(config.source)
    if "text_config" in cfg or "hidden_size" not in cfg:   # (the Hub's Qwen2.5-VL configs keep the decoder at the top)
        text = dict(cfg.get("text_config") or {})
        text["tie_word_embeddings"] = config.tie_word_embeddings
        cfg["text_config"] = text
    cfg.update(tie_word_embeddings=config.tie_word_embeddings,
               model_type=config.multimodal_type,
               architectures=[VISION_FAMILIES[config.multimodal_type].architecture])   # type: ignore[index]
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = DTYPE_NAMES[dtype]
    return cfg


def checkpoint_names(config: ModelConfig, tensors: list[PlannedTensor]) -> list[PlannedTensor]:
    """A vision-language model's tensors under its checkpoint names (models/vision_families.py),
    transposed where the checkpoint stores a bare matrix; a text model's as they are."""
    if config.multimodal_type is None:
        return tensors
    family = VISION_FAMILIES[config.multimodal_type]
    renamed = []
    for t in tensors:
        name, flip = to_hf(t.name, family)
        renamed.append(PlannedTensor(name, t.shape[::-1], lambda r=t.read: r().t()) if flip
                       else PlannedTensor(name, t.shape, t.read))
    return renamed


def shard_plan(items: Sequence[T], sizes: Sequence[int], max_bytes: int) -> list[list[T]]:
    """`items` in order, split where the next one would take a shard past `max_bytes` (an item
    larger than that gets a shard of its own)."""
    shards: list[list[T]] = [[]]
    used = 0
    for item, size in zip(items, sizes):
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += size
    return shards


def weight_files(out: Path, shards: int) -> list[str]:
    """Creates `out`, deletes the weight files and index of an earlier export there (a smaller
    model must not leave stale shards beside its own), and names the `shards` files."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    return ["model.safetensors"] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                                                      for i in range(shards)]


def write_index(out: Path, weight_map: dict[str, str], total: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor (written for sharded folders)."""
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n", encoding="utf-8")


def save_hf(model: Transformer, tokenizer: Any, out: Path, dtype: torch.dtype,
            generation_config: dict[str, Any] | None = None, max_shard_size: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the merged model into the folder `out`; returns it."""
    if dtype not in DTYPE_NAMES:
        raise ExportError(f"dtype {dtype} cannot be written; choose one of {', '.join(HF_DTYPES)}")
    if max_shard_size <= 0:
        raise ExportError(f"max_shard_size must be positive, got {max_shard_size}")
    config = export_config(model)
    tensors = checkpoint_names(config, plan_tensors(model))
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = shard_plan(tensors, [itemsize * int(torch.Size(t.shape).numel()) for t in tensors], max_shard_size)
    names = weight_files(out, len(shards))

    weight_map: dict[str, str] = {}
    total = 0
    shard_of = {t.name: i for i, shard in enumerate(shards) for t in shard}
    pending: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for t in track(tensors, len(tensors), f"safetensors {DTYPE_NAMES[dtype]}"):
            value = t.read().to(dtype).contiguous()
            pending[t.name] = value
            total += value.numel() * value.element_size()
            index = shard_of[t.name]
            weight_map[t.name] = names[index]
            if t is shards[index][-1]:
                save_safetensors(pending, str(out / names[index]), metadata={"format": "pt"})
                pending = {}
    if len(shards) > 1:
        write_index(out, weight_map, total)

    write_sidecars(out, config_json(config, dtype), config, generation_config, tokenizer)
    return out


def write_sidecars(out: Path, cfg: dict[str, Any], config: ModelConfig, generation_config: dict[str, Any] | None,
                   tokenizer: Any) -> None:
    """config.json (`cfg`), generation_config.json (with the config's BOS/EOS/pad ids) and the
    tokenizer files, beside the weights."""
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    generation = dict(generation_config or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if generation.get(key) is None and getattr(config, key) is not None:
            generation[key] = getattr(config, key)
    if generation:
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(out)
