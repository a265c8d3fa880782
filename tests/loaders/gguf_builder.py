"""Tiny GGUF files for tests, written the way llama.cpp's converter writes them.

Import it as `tests.loaders.gguf_builder` (pytest runs in importlib mode). `build_gguf` turns a
Hugging Face named state dict into GGUF names and layout (the forward mapping: q/k row interleave
for llama, w + 1 for Gemma 2 norms, Phi-3 fused names) plus the converter's metadata; tests may
edit the returned `GGUFContents` (drop a key, swap a tensor) before `write_gguf` puts it on disk.
Weights are random but seeded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

# Small configs, one per family, in Hugging Face's spelling.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=96,
                  max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=96,
                   max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=64,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=96, max_position_embeddings=256,
                 original_max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                 sliding_window=127, tie_word_embeddings=False),
}

GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}
GEMMA2_BLOCK = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def random_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face named weights of the config's family (Phi-3's q/k/v and gate/up fused)."""
    g = torch.Generator().manual_seed(seed)
    fam, h, i, hd = cfg["model_type"], cfg["hidden_size"], cfg["intermediate_size"], head_dim(cfg)
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.5

    sd = {"model.embed_tokens.weight": rand(cfg["vocab_size"], h), "model.norm.weight": rand(h)}
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = rand(cfg["vocab_size"], h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd[p + "input_layernorm.weight"] = rand(h)
        sd[p + "post_attention_layernorm.weight"] = rand(h)
        sd[p + "self_attn.o_proj.weight"] = rand(h, q)
        sd[p + "mlp.down_proj.weight"] = rand(h, i)
        if fam == "phi3":
            sd[p + "self_attn.qkv_proj.weight"] = rand(q + 2 * kv, h)
            sd[p + "mlp.gate_up_proj.weight"] = rand(2 * i, h)
            continue
        sd[p + "self_attn.q_proj.weight"] = rand(q, h)
        sd[p + "self_attn.k_proj.weight"] = rand(kv, h)
        sd[p + "self_attn.v_proj.weight"] = rand(kv, h)
        sd[p + "mlp.gate_proj.weight"] = rand(i, h)
        sd[p + "mlp.up_proj.weight"] = rand(i, h)
        if fam == "qwen2":
            for part, rows in (("q", q), ("k", kv), ("v", kv)):
                sd[p + f"self_attn.{part}_proj.bias"] = rand(rows)
        if cfg.get("attention_bias"):  # Llama-style: q, k, v and o
            for part, rows in (("q", q), ("k", kv), ("v", kv), ("o", h)):
                sd[p + f"self_attn.{part}_proj.bias"] = rand(rows)
        if fam == "qwen3":
            sd[p + "self_attn.q_norm.weight"] = rand(hd)
            sd[p + "self_attn.k_norm.weight"] = rand(hd)
        if fam == "gemma2":
            sd[p + "pre_feedforward_layernorm.weight"] = rand(h)
            sd[p + "post_feedforward_layernorm.weight"] = rand(h)
    return sd


def interleave_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, family: str) -> str:
    if hf in GLOBAL:
        return GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    table = {**BLOCK, **GEMMA2_BLOCK} if family == "gemma2" else BLOCK
    return f"blk.{layer}.{table[module]}.{kind}"


def to_gguf_layout(hf: str, w: torch.Tensor, cfg: dict[str, Any]) -> np.ndarray:
    a = w.numpy().astype(np.float32)
    fam = cfg["model_type"]
    if fam == "llama" and ".self_attn.q_proj." in hf:
        a = interleave_rows(a, cfg["num_attention_heads"])
    elif fam == "llama" and ".self_attn.k_proj." in hf:
        a = interleave_rows(a, cfg["num_key_value_heads"])
    elif fam == "gemma2" and hf.endswith("norm.weight"):
        a = a + 1.0
    return a


@dataclass
class GGUFContents:
    arch: str
    metadata: dict[str, Any]
    # GGUF name -> (array in Hugging Face row-major shape, or raw bytes for `raw`, type)
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = field(default_factory=dict)


def metadata_for(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """The keys llama.cpp's converter writes for this config (the vocabulary only as a token list)."""
    p = arch + "."
    meta: dict[str, Any] = {
        p + "block_count": cfg["num_hidden_layers"],
        p + "context_length": cfg["max_position_embeddings"],
        p + "embedding_length": cfg["hidden_size"],
        p + "feed_forward_length": cfg["intermediate_size"],
        p + "attention.head_count": cfg["num_attention_heads"],
        p + "attention.head_count_kv": cfg["num_key_value_heads"],
        p + "attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
        p + "rope.freq_base": cfg["rope_theta"],
        "tokenizer.ggml.tokens": [f"tok{n}" for n in range(cfg["vocab_size"])],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    if "head_dim" in cfg:
        meta[p + "attention.key_length"] = cfg["head_dim"]
        meta[p + "attention.value_length"] = cfg["head_dim"]
    if arch in ("llama", "phi3"):
        meta[p + "rope.dimension_count"] = head_dim(cfg)
    if arch == "gemma2":
        meta[p + "attn_logit_softcapping"] = cfg["attn_logit_softcapping"]
        meta[p + "final_logit_softcapping"] = cfg["final_logit_softcapping"]
        meta[p + "attention.sliding_window"] = cfg["sliding_window"]
        del meta[p + "rope.freq_base"]  # the Gemma 2 converter writes none (llama.cpp uses 10000)
    if arch == "phi3":
        meta[p + "rope.scaling.original_context_length"] = cfg["original_max_position_embeddings"]
        meta[p + "attention.sliding_window"] = cfg["sliding_window"]
    return meta


def build_gguf(cfg: dict[str, Any], sd: dict[str, torch.Tensor],
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> GGUFContents:
    """GGUF names, layout and metadata for a state dict; 2-D weights in `qtype`, 1-D ones in F32."""
    arch = "llama" if cfg["model_type"] == "mistral" else cfg["model_type"]
    contents = GGUFContents(arch, metadata_for(cfg, arch))
    for hf, w in sd.items():
        a = to_gguf_layout(hf, w, cfg)
        kind = qtype if a.ndim == 2 else gguf.GGMLQuantizationType.F32
        contents.tensors[gguf_name(hf, cfg["model_type"])] = (a, kind)
    return contents


def write_gguf(path: Path, contents: GGUFContents) -> Path:
    writer = gguf.GGUFWriter(str(path), contents.arch)
    for key, value in contents.metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (a, qtype) in contents.tensors.items():
        if a.dtype == np.uint8:  # raw blocks, already encoded
            writer.add_tensor(name, a, raw_dtype=qtype)
        elif qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, gguf.quants.quantize(a, qtype))
        else:
            writer.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_divisors(head_dim: int, theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The `rope_freqs.weight` values llama.cpp's converter writes for Llama 3 RoPE scaling."""
    out = []
    for k in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (k / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)
