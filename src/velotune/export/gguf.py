"""GGUF export, written in Python with gguf-py's `GGUFWriter` (no llama.cpp build, no shell-out).

The file is laid out the way llama.cpp's own converter (convert_hf_to_gguf.py) lays it out, so
llama.cpp, Ollama and our GGUF loader read it:
- names: the inverse of the loader's llama.cpp -> Hugging Face table (`velotune.loaders.gguf`),
  so the two directions cannot drift apart;
- llama (and Mistral, written as "llama" like llama.cpp does): q/k rows (weights and biases)
  interleaved per head for llama.cpp's RoPE; Gemma 2: RMSNorm weights stored as w + 1; Phi-3:
  fused `attn_qkv` and `ffn_up` (gate then up); Llama 3 RoPE scaling as a `rope_freqs` tensor;
- types: 1-D tensors (norms, biases) and `rope_freqs` stay f32; every 2-D weight takes the
  requested type. A row length that is not a multiple of the type's block falls back to f16
  (what the converter does). For 4-bit types the output head (the embedding when tied) is kept at
  q8_0, standing in for the q6_K that llama-quantize uses there: gguf-py can dequantize the
  k-quants (q4_K, q6_K, ...) but not quantize them, so Q4_K_M is not offered; q4_0, q4_1, q5_0
  and q5_1 are quantized by gguf-py (`gguf.quants.quantize`).
- metadata: the architecture keys llama.cpp reads for the family, the tokenizer
  (`gguf_tokenizer.py`), the chat template, `general.file_type`.

Everything that can fail is checked before the file is opened (quant type, architecture,
features a GGUF of that architecture cannot express); the tensor table is written first and the
data streamed after it, one tensor at a time, so memory stays near one layer.

Like llama.cpp, a sliding window on Mistral/Qwen2/Qwen3 is not written (their llama.cpp
architectures have none): outputs differ only past the window.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, quants

from velotune.export.errors import ExportError
from velotune.export.gguf_tokenizer import add_tokenizer, gguf_tokenizer
from velotune.export.progress import track
from velotune.export.weights import PlannedTensor, export_config, plan_tensors
from velotune.loaders.gguf import BLOCK_NAMES, FAMILY_BLOCK_NAMES, GLOBAL_NAMES, ROPE_FREQS, llama3_divisors
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer

Q = GGMLQuantizationType
# quant name -> (type of 2-D weights, file type, type of the output head)
GGUF_QUANTS: dict[str, tuple[Q, LlamaFileType, Q]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32, Q.F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1, Q.Q8_0),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0, Q.Q8_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1, Q.Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0, Q.Q8_0),
}
# model_type -> llama.cpp general.architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "gemma2": "gemma2", "phi3": "phi3"}
PERMUTED_ARCHS = ("llama",)            # q/k rows interleaved for llama.cpp's RoPE
NORM_PLUS_ONE_ARCHS = ("gemma2",)      # RMSNorm weights stored as w + 1


def gguf_tensor_name(hf_name: str, family: str) -> str:
    """Hugging Face name -> llama.cpp name, by inverting the loader's table."""
    path, kind = hf_name.rsplit(".", 1)
    globals_ = {hf: gg for gg, hf in GLOBAL_NAMES.items()}
    if path in globals_:
        return f"{globals_[path]}.{kind}"
    parts = path.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3:
        table = {hf: gg for gg, hf in {**BLOCK_NAMES, **FAMILY_BLOCK_NAMES.get(family, {})}.items()}
        module = ".".join(parts[3:])
        if module in table:
            return f"blk.{parts[2]}.{table[module]}.{kind}"
    raise ExportError(f"tensor {hf_name!r} has no llama.cpp name for a {family} model")


def interleave_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, the two rotate-half halves interleaved pairwise
    (the inverse of the loader's `unpermute_rows`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture for this config, or an ExportError naming what a GGUF of that
    architecture cannot hold."""
    family = config.model_type
    arch = ARCHITECTURES.get(family)
    if arch is None:
        raise ExportError(f"architecture {family!r} cannot be exported to GGUF; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    if arch in ("qwen3", "gemma2", "phi3") and (config.qkv_bias or config.o_bias):
        raise ExportError(f"{family}: attention biases cannot be expressed in a llama.cpp {arch} GGUF")
    if arch != "llama" and config.mlp_bias:
        raise ExportError(f"{family}: MLP biases cannot be expressed in a llama.cpp {arch} GGUF")
    if arch == "gemma2":
        scale = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46 else config.head_dim
        if (config.query_pre_attn_scalar or config.head_dim) != scale:
            raise ExportError(f"gemma2: query_pre_attn_scalar={config.query_pre_attn_scalar} cannot be expressed in "
                              f"GGUF (llama.cpp assumes {scale} for a {config.num_hidden_layers}-layer model)")
        pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
        if config.sliding_window and config.layer_types != pattern:
            raise ExportError("gemma2: llama.cpp slides the window on even layers only; this config's layer_types "
                              f"{config.layer_types} differ")
    if arch == "gemma2" and not config.tie_word_embeddings:
        raise ExportError("gemma2: llama.cpp's Gemma 2 has no output head of its own; an adapter on the tied "
                          "embedding or head cannot be exported to GGUF")
    if config.rope_scaling and arch != "llama":
        raise ExportError(f"{family}: RoPE scaling {config.rope_scaling} is only written for llama GGUFs")
    return arch


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]                     # row-major (Hugging Face order)
    qtype: Q
    read: Callable[[], np.ndarray]             # float32 in llama.cpp layout

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def tensor_type(t: PlannedTensor, quant: str, tied: bool) -> Q:
    weights, _, head = GGUF_QUANTS[quant]
    if len(t.shape) < 2 or t.name.endswith("norm.weight"):
        return Q.F32
    is_head = t.name == "lm_head.weight" or (tied and t.name == "model.embed_tokens.weight")
    qtype = head if is_head else weights
    if t.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def plan_gguf(model: Transformer, quant: str) -> list[GGUFTensor]:
    config = export_config(model)
    arch = check_architecture(config)
    family = config.model_type

    def converted(t: PlannedTensor) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            w = t.read()
            if arch in PERMUTED_ARCHS and ".self_attn.q_proj." in t.name:
                w = interleave_rows(w, config.num_attention_heads)
            elif arch in PERMUTED_ARCHS and ".self_attn.k_proj." in t.name:
                w = interleave_rows(w, config.num_key_value_heads)
            elif arch in NORM_PLUS_ONE_ARCHS and t.name.endswith("norm.weight"):
                w = w + 1.0
            return w.numpy()
        return read

    tensors = [GGUFTensor(gguf_tensor_name(t.name, family), t.shape, tensor_type(t, quant, config.tie_word_embeddings), converted(t))
               for t in plan_tensors(model)]
    if config.rope_scaling and config.rope_scaling["rope_type"] == "llama3":
        dim = config.rotary_dim
        freqs = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        divisors = llama3_divisors(freqs, config.rope_scaling).astype(np.float32)
        tensors.insert(0, GGUFTensor(ROPE_FREQS, divisors.shape, Q.F32, lambda: divisors))
    return tensors


def architecture_metadata(config: ModelConfig, arch: str, quant: str) -> dict[str, Any]:
    """Key -> value, spelled as llama.cpp reads them (typed by `write_metadata`)."""
    p = arch + "."
    meta: dict[str, Any] = {
        "general.file_type": int(GGUF_QUANTS[quant][1]),
        "general.quantization_version": 2,
        p + "vocab_size": config.vocab_size,
        p + "context_length": config.max_position_embeddings,
        p + "embedding_length": config.hidden_size,
        p + "block_count": config.num_hidden_layers,
        p + "feed_forward_length": config.intermediate_size,
        p + "attention.head_count": config.num_attention_heads,
        p + "attention.head_count_kv": config.num_key_value_heads,
        p + "attention.key_length": config.head_dim,
        p + "attention.value_length": config.head_dim,
        p + "attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        p + "rope.freq_base": config.rope_theta,
        p + "rope.dimension_count": config.rotary_dim,
    }
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        meta[p + "rope.scaling.type"] = "linear"
        meta[p + "rope.scaling.factor"] = float(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":  # the divisors are the rope_freqs tensor; this key lets
        # a reader recover the config's own low/high factors from them (llama.cpp ignores it here)
        meta[p + "rope.scaling.original_context_length"] = int(scaling.get("original_max_position_embeddings", 8192))
    if arch == "gemma2":
        meta[p + "attn_logit_softcapping"] = config.attn_logit_softcapping or 0.0
        meta[p + "final_logit_softcapping"] = config.final_logit_softcapping or 0.0
    if arch in ("gemma2", "phi3") and config.sliding_window:
        meta[p + "attention.sliding_window"] = config.sliding_window
    if arch == "phi3" and (original := config.source.get("original_max_position_embeddings")):
        meta[p + "rope.scaling.original_context_length"] = int(original)
    return meta


def write_metadata(writer: GGUFWriter, meta: dict[str, Any]) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)


def encode(t: GGUFTensor) -> np.ndarray:
    data = quants.quantize(np.ascontiguousarray(t.read(), dtype=np.float32), t.qtype)
    if data.nbytes != t.nbytes:
        raise ExportError(f"tensor {t.name!r}: encoded to {data.nbytes} bytes, expected {t.nbytes}")
    return data


def save_gguf(model: Transformer, tokenizer: Any, out: Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write `out` (a .gguf file) from the model as it computes (adapters merged)."""
    if quant not in GGUF_QUANTS:
        raise ExportError(f"quant type {quant!r} is not supported for GGUF; choose one of {', '.join(GGUF_QUANTS)}")
    config = export_config(model)
    arch = check_architecture(config)
    if tokenizer is None:
        raise ExportError("a GGUF needs the tokenizer (llama.cpp cannot run a file without its vocabulary)")
    vocabulary = gguf_tokenizer(tokenizer, config)
    tensors = plan_gguf(model, quant)

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), arch)
    if name:
        writer.add_name(name)
    write_metadata(writer, architecture_metadata(config, arch, quant))
    add_tokenizer(writer, vocabulary)
    for t in tensors:
        if t.qtype in (Q.F32, Q.F16):
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if t.qtype == Q.F32 else np.float16), t.nbytes)
        else:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with torch.no_grad():
        for t in track(tensors, len(tensors), f"GGUF {quant}"):
            writer.write_tensor_data(encode(t))
    writer.close()
    return out
