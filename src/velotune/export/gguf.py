"""GGUF export, written in Python with gguf-py's `GGUFWriter` (no llama.cpp build, no shell-out).

The file is laid out the way llama.cpp's own converter (convert_hf_to_gguf.py) lays it out, so
llama.cpp, Ollama and our GGUF loader read it:
- names: the inverse of the loader's llama.cpp -> Hugging Face table (`velotune.loaders.gguf`),
  so the two directions cannot drift apart;
- llama (and Mistral, written as "llama" like llama.cpp does): q/k rows (weights and biases)
  interleaved per head for llama.cpp's RoPE; Gemma 2: RMSNorm weights stored as w + 1; Phi-3:
  fused `attn_qkv` and `ffn_up` (gate then up); Llama 3 RoPE scaling as a `rope_freqs` tensor;
- types: 1-D tensors (norms, biases) and `rope_freqs` stay f32; 2-D weights take the requested
  type, with llama-quantize's mix (`tensor_type`): the output head (the embedding when tied) in
  q6_K for every quantized type below q8_0, and for q4_k_m q6_K on attn_v and ffn_down of the
  layers `use_more_bits` picks (q5_K on a fused attn_qkv); q4_k_s q5_K on the first attn_v and
  ffn_down. A row length that is not a multiple of the type's block takes llama.cpp's fallback
  (q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0, then f16). The k-quants are quantized by our
  `kquants.py` (gguf-py cannot), the others by gguf-py -- or, with calibration
  (`calibration.py`, the default for 4-bit types), all by error-compensated rounding.
- metadata: the architecture keys llama.cpp reads for the family, the tokenizer
  (`gguf_tokenizer.py`), the chat template, `general.file_type`.

Everything that can fail is checked before the file is opened (quant type, architecture,
features a GGUF of that architecture cannot express); the tensor table is written first and the
data streamed after it, one tensor at a time, so memory stays near one layer.

A vision-language model's decoder is written here like any text model; its vision tower and
projector go to llama.cpp's separate mmproj file (`mmproj.py`). A decoder with M-RoPE
(Qwen2.5-VL's) is written as llama.cpp's M-RoPE variant of its architecture (`qwen2vl`), its
sections as `rope.dimension_sections`, so libmtmd gives image tokens their 2-D positions.

Like llama.cpp, a sliding window on Mistral/Qwen2/Qwen3 is not written (their llama.cpp
architectures have none): outputs differ only past the window.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, quants

from velotune.export.blockgrid import LEGACY
from velotune.export.calibration import LayerStatistics, gptq_quantize
from velotune.export.dynamic import choose_types, fisher_diagonals
from velotune.export.errors import ExportError
from velotune.export.gguf_tokenizer import add_tokenizer, gguf_tokenizer
from velotune.export.kquants import K_QUANTS
from velotune.export.mmproj import VISION_PREFIXES, check_mmproj, mmproj_path, save_mmproj
from velotune.export.progress import track
from velotune.export.weights import PlannedTensor, export_config, plan_tensors
from velotune.loaders.gguf import GEMMA3_LOCAL_ROPE_THETA, ROPE_FREQS, SMOLLM3_NOPE_INTERVAL, llama3_divisors
from velotune.models.calibration import calibration_ids
from velotune.models.config import ModelConfig
from velotune.models.families import FAMILIES, GGUF_BARE_PARAMETERS, GGUF_GLOBAL_NAMES
from velotune.models.transformer import Transformer

Q = GGMLQuantizationType
# quant name -> (type of 2-D weights, file type)
GGUF_QUANTS: dict[str, tuple[Q, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q6_k": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q4_k_s": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "dynamic": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),   # per-weight types within Q4_K_M's size (dynamic.py)
}
DYNAMIC, DYNAMIC_BUDGET = "dynamic", "q4_k_m"   # the mix whose size the dynamic one keeps to
# Types whose export rounds with calibration unless asked not to: at 4 bits round-to-nearest
# loses a fine-tune (benchmarks/quantized_answers.py measures it).
CALIBRATED_BY_DEFAULT = ("q4_k_m", "q4_k_s", "q4_1", "q4_0", DYNAMIC)
# llama.cpp's replacement for a type whose block does not divide the row length
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
CODECS = {**LEGACY, **K_QUANTS}
# model_type -> llama.cpp general.architecture, for the families a GGUF can hold (models/families.py)
ARCHITECTURES = {f.model_type: f.gguf_arch for f in FAMILIES.values() if f.gguf_arch}
# llama.cpp's architecture for such a decoder whose rotary positions are M-RoPE (Qwen2.5-VL's Qwen 2:
# the same tensors, `rope.dimension_sections`, and libmtmd giving image tokens 2-D positions)
MROPE_ARCHITECTURES = {"qwen2": "qwen2vl"}
MROPE_SECTIONS = 4    # llama.cpp's rope.dimension_sections length (temporal, height, width, unused)
# The bias switches of ModelConfig, by the projections whose biases they put in every layer.
BIAS_FIELDS = {"qkv_bias": "q/k/v_proj", "o_bias": "o_proj", "mlp_bias": "gate/up/down_proj",
               "router_bias": "the router", "expert_bias": "the experts"}
# The biases each llama.cpp architecture's loader reads (its `create_tensor` calls): any other would
# be written under a name llama.cpp either rejects (a tensor it does not load) or never adds, so
# the file would not answer as the model does. Qwen 2 (and its M-RoPE qwen2vl) reads the q/k/v
# biases and no o_proj or MLP bias; Llama (and Mistral, written as llama) reads all three.
GGUF_BIASES: dict[str, frozenset[str]] = {
    "llama": frozenset({"qkv_bias", "o_bias", "mlp_bias"}),
    "qwen2": frozenset({"qkv_bias"}),
    "qwen2vl": frozenset({"qkv_bias"}),
    "qwen3": frozenset(), "qwen3moe": frozenset(), "gemma2": frozenset(), "gemma3": frozenset(),
    "phi3": frozenset(), "smollm3": frozenset(),
    "gpt-oss": frozenset({"qkv_bias", "o_bias", "router_bias", "expert_bias"}),
}
# llama.cpp's gpt-oss: its clamped SwiGLU's constants are fixed in its graph, and it loads every
# bias and an output head of its own
GPT_OSS_SWIGLU = (1.702, 7.0)


def gguf_tensor_name(hf_name: str, family: str) -> str:
    """Hugging Face name -> llama.cpp name, by inverting the loader's table."""
    path, kind = hf_name.rsplit(".", 1)
    globals_ = {hf: gg for gg, hf in GGUF_GLOBAL_NAMES.items()}
    if path in globals_:
        return f"{globals_[path]}.{kind}"
    parts = path.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3:
        table = {hf: gg for gg, hf in FAMILIES[family].gguf_block_names().items()}
        module = ".".join(parts[3:])
        if f"{module}.{kind}" in GGUF_BARE_PARAMETERS and f"{module}.{kind}" in table:
            return f"blk.{parts[2]}.{table[f'{module}.{kind}']}.weight"
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
    if config.mrope_section is not None:
        if arch not in MROPE_ARCHITECTURES:
            raise ExportError(f"{family}: llama.cpp has no M-RoPE (mrope_section) variant of its {arch} architecture")
        arch = MROPE_ARCHITECTURES[arch]
    _check_biases(config, arch)
    if arch == "gemma2":
        scale = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46 else config.head_dim
        if (config.query_pre_attn_scalar or config.head_dim) != scale:
            raise ExportError(f"gemma2: query_pre_attn_scalar={config.query_pre_attn_scalar} cannot be expressed in "
                              f"GGUF (llama.cpp assumes {scale} for a {config.num_hidden_layers}-layer model)")
        pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
        if config.sliding_window and config.layer_types != pattern:
            raise ExportError("gemma2: llama.cpp slides the window on even layers only; this config's layer_types "
                              f"{config.layer_types} differ")
    if arch == "gemma3":
        _check_gemma3(config)
    if config.num_experts:
        _check_experts(config, arch)
    if arch == "smollm3":
        pattern = [int((i + 1) % SMOLLM3_NOPE_INTERVAL != 0) for i in range(config.num_hidden_layers)]
        if config.no_rope_layers and config.no_rope_layers != pattern:
            raise ExportError(f"smollm3: llama.cpp drops RoPE in every {SMOLLM3_NOPE_INTERVAL}th layer only; this "
                              f"config's no_rope_layers {config.no_rope_layers} differ")
    if arch in ("gemma2", "gemma3") and not config.tie_word_embeddings:
        raise ExportError(f"{arch}: llama.cpp's Gemma has no output head of its own; an adapter on the tied "
                          "embedding or head cannot be exported to GGUF")
    kind = (config.rope_scaling or {}).get("rope_type")
    scaling_ok = (arch == "gemma3" and kind == "linear") or (arch == "gpt-oss" and kind == "yarn")
    if config.rope_scaling and arch != "llama" and not scaling_ok:
        raise ExportError(f"{family}: RoPE scaling {config.rope_scaling} is only written for llama GGUFs")
    return arch


def _check_biases(config: ModelConfig, arch: str) -> None:
    """Every bias the config switches on is one llama.cpp's `arch` loads (GGUF_BIASES)."""
    accepted = GGUF_BIASES[arch]
    for name, projections in BIAS_FIELDS.items():
        if getattr(config, name) and name not in accepted:
            held = ", ".join(BIAS_FIELDS[b] for b in BIAS_FIELDS if b in accepted) or "none"
            raise ExportError(f"{config.model_type}: {name} (a bias on {projections}) cannot be expressed in a "
                              f"llama.cpp {arch} GGUF; its {arch} graph has biases on: {held}")


def _check_gemma3(config: ModelConfig) -> None:
    """What llama.cpp assumes of a Gemma 3 file, checked against the config."""
    scale = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else config.head_dim
    if (config.query_pre_attn_scalar or config.head_dim) != scale:
        raise ExportError(f"gemma3: query_pre_attn_scalar={config.query_pre_attn_scalar} cannot be expressed in GGUF "
                          f"(llama.cpp assumes {scale} for a {config.num_hidden_layers}-layer model)")
    if config.sliding_window:
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
        if config.layer_types != pattern:
            raise ExportError("gemma3: llama.cpp makes every sixth layer global; this config's layer_types "
                              f"{config.layer_types} differ")
        if (config.local_rope_theta or config.rope_theta) != GEMMA3_LOCAL_ROPE_THETA:
            raise ExportError(f"gemma3: llama.cpp's sliding layers use RoPE base {GEMMA3_LOCAL_ROPE_THETA:g}, this "
                              f"config {config.local_rope_theta or config.rope_theta:g}")


def _check_experts(config: ModelConfig, arch: str) -> None:
    """What llama.cpp's qwen3moe and gpt-oss graphs assume of the experts and the layers."""
    if not all(config.moe_layers):
        dense = [i for i, moe in enumerate(config.moe_layers) if not moe]
        raise ExportError(f"{config.model_type}: llama.cpp's {arch} has experts in every layer; layers {dense} "
                          "are dense (mlp_only_layers / decoder_sparse_step)")
    if arch == "qwen3moe" and not config.norm_topk_prob:
        raise ExportError("qwen3_moe: llama.cpp renormalises the chosen experts' weights; norm_topk_prob=false "
                          "cannot be expressed in GGUF")
    if arch == "gpt-oss":
        if (config.swiglu_alpha, config.swiglu_limit) != GPT_OSS_SWIGLU:
            raise ExportError(f"gpt_oss: llama.cpp's clamped SwiGLU uses alpha, limit = {GPT_OSS_SWIGLU}; this "
                              f"config has {(config.swiglu_alpha, config.swiglu_limit)}")
        if not (config.qkv_bias and config.o_bias and config.expert_bias and config.router_bias):
            raise ExportError("gpt_oss: llama.cpp's gpt-oss loads attention, router and expert biases; this "
                              "config has none (attention_bias: false)")
        pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
        if config.sliding_window and config.layer_types != pattern:
            raise ExportError("gpt_oss: llama.cpp slides the window on even layers only; this config's layer_types "
                              f"{config.layer_types} differ")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]                     # row-major (Hugging Face order)
    qtype: Q
    read: Callable[[], np.ndarray]             # float32 in llama.cpp layout
    source: str = ""                           # Hugging Face name (calibration statistics)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def use_more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's choice of layers that get more bits: the first and last eighth and every
    third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str, tied: bool, layers: int) -> Q:
    """The GGUF type of one tensor in a `quant` export, following llama-quantize's mix (the
    dynamic mix starts from Q4_K_M's)."""
    quant = DYNAMIC_BUDGET if quant == DYNAMIC else quant
    qtype, _ = GGUF_QUANTS[quant]
    if len(shape) < 2 or gguf_name.endswith(("norm.weight", ".bias")) or ".ffn_gate_inp." in gguf_name:
        return Q.F32     # like llama-quantize, the experts' router and the (stacked) biases stay f32
    is_head = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
    if is_head and qtype not in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):
        qtype = Q.Q6_K
    elif quant == "q4_k_m" and ".attn_qkv." in gguf_name:
        qtype = Q.Q5_K
    elif quant == "q4_k_m" and (".attn_v." in gguf_name or ".ffn_down" in gguf_name) and use_more_bits(layer, layers):
        qtype = Q.Q6_K
    elif quant == "q4_k_s" and ((".attn_v." in gguf_name and layer < 4) or
                                (".ffn_down" in gguf_name and layer < layers // 8)):
        qtype = Q.Q5_K
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = FALLBACK.get(qtype, Q.F16)
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    return qtype


def gguf_layout(config: ModelConfig, hf_name: str, w: torch.Tensor) -> torch.Tensor:
    """A Hugging Face tensor as llama.cpp stores it: q/k rows interleaved, norms shifted."""
    row = FAMILIES[config.model_type]
    if row.gguf_qk_interleaved and ".self_attn.q_proj." in hf_name:
        return interleave_rows(w, config.num_attention_heads)
    if row.gguf_qk_interleaved and ".self_attn.k_proj." in hf_name:
        return interleave_rows(w, config.num_key_value_heads)
    if row.gguf_norm_shift and hf_name.endswith("norm.weight"):
        return w + row.gguf_norm_shift
    return w


def plan_gguf(model: Transformer, quant: str) -> list[GGUFTensor]:
    config = export_config(model)
    check_architecture(config)
    family = config.model_type
    row = FAMILIES[family]

    def converted(t: PlannedTensor) -> Callable[[], np.ndarray]:
        return lambda: gguf_layout(config, t.name, t.read()).numpy()

    # a vision-language model's tower and projector go to the separate mmproj file (mmproj.py)
    planned = [t for t in plan_tensors(model, "gguf") if not t.name.startswith(VISION_PREFIXES)]
    if row.gguf_untied_head and config.tie_word_embeddings:   # the head written as a tensor of its own
        embedding = next(t for t in planned if t.name == "model.embed_tokens.weight")
        planned.append(PlannedTensor("lm_head.weight", embedding.shape, embedding.read))
    tied = config.tie_word_embeddings and not row.gguf_untied_head
    tensors = []
    for t in planned:
        name = gguf_tensor_name(t.name, family)
        qtype = tensor_type(name, t.shape, quant, tied, config.num_hidden_layers)
        tensors.append(GGUFTensor(name, t.shape, qtype, converted(t), t.name))
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
    if arch == "gemma3" and config.final_logit_softcapping:
        meta[p + "final_logit_softcapping"] = config.final_logit_softcapping
    if arch in ("gemma2", "gemma3", "phi3", "gpt-oss") and config.sliding_window:
        meta[p + "attention.sliding_window"] = config.sliding_window
    if config.num_experts:
        meta[p + "expert_count"] = config.num_experts
        meta[p + "expert_used_count"] = config.num_experts_per_tok
        meta[p + "expert_feed_forward_length"] = config.moe_intermediate_size
    if scaling.get("rope_type") == "yarn":     # llama.cpp rounds the correction range (truncate: true)
        meta[p + "rope.scaling.type"] = "yarn"
        meta[p + "rope.scaling.factor"] = float(scaling["factor"])
        meta[p + "rope.scaling.original_context_length"] = int(scaling["original_max_position_embeddings"])
        meta[p + "rope.scaling.yarn_beta_fast"] = float(scaling.get("beta_fast", 32.0))
        meta[p + "rope.scaling.yarn_beta_slow"] = float(scaling.get("beta_slow", 1.0))
    if arch == "phi3" and (original := config.source.get("original_max_position_embeddings")):
        meta[p + "rope.scaling.original_context_length"] = int(original)
    if config.mrope_section is not None:
        sections = list(config.mrope_section)
        meta[p + "rope.dimension_sections"] = sections + [0] * (MROPE_SECTIONS - len(sections))
    return meta


def write_metadata(writer: GGUFWriter, meta: dict[str, Any]) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, value)


def encode(t: GGUFTensor, statistics: LayerStatistics | None = None) -> np.ndarray:
    """The tensor's bytes: with calibration statistics for its input, error-compensated rounding;
    otherwise round-to-nearest (gguf-py's, or ours for the k-quants)."""
    w = np.ascontiguousarray(t.read(), dtype=np.float32)
    hessian = statistics.hessian(t.source) if statistics is not None and t.qtype in CODECS else None
    if hessian is not None:
        data = gptq_quantize(w, hessian, CODECS[t.qtype])
    elif t.qtype in K_QUANTS:
        data = K_QUANTS[t.qtype].quantize(w)
    else:
        data = quants.quantize(w, t.qtype)
    if data.nbytes != t.nbytes:
        raise ExportError(f"tensor {t.name!r}: encoded to {data.nbytes} bytes, expected {t.nbytes}")
    return data


def dynamic_mix(model: Transformer, tokenizer: Any, config: ModelConfig, tensors: list[GGUFTensor],
                calibration: tuple[torch.Tensor, torch.Tensor] | None) -> list[GGUFTensor]:
    """The tensors with the dynamic mix's types (`dynamic.py`), within the Q4_K_M file's bytes."""
    ids, positions = calibration if calibration is not None else calibration_ids(tokenizer)
    fisher = fisher_diagonals(model, ids, positions)
    budget = sum(t.nbytes for t in tensors)         # planned with Q4_K_M's types
    chosen = choose_types(tensors, fisher, budget, lambda name, value: gguf_layout(config, name, value))
    return [dataclasses.replace(t, qtype=chosen.get(t.name, t.qtype)) for t in tensors]


def check_calibrate(quant: str, calibrate: bool | None) -> bool:
    """Whether a `quant` export rounds with calibration (None: the type's default)."""
    if quant not in GGUF_QUANTS:
        raise ExportError(f"quant type {quant!r} is not supported for GGUF; choose one of {', '.join(GGUF_QUANTS)}")
    if calibrate and GGUF_QUANTS[quant][0] in (Q.F32, Q.F16, Q.BF16):
        raise ExportError(f"calibration applies to quantized types; {quant} is not quantized")
    return quant in CALIBRATED_BY_DEFAULT if calibrate is None else calibrate


def save_gguf(model: Transformer, tokenizer: Any, out: Path, quant: str = "f16", name: str | None = None,
              calibrate: bool | None = None, calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write `out` (a .gguf file) from the model as it computes (adapters merged). `calibrate`:
    round with calibration statistics (`calibration.py`); None picks the type's default
    (on for the 4-bit types); `calibration`: the run's training rows (ids, positions), else generic text.
    A vision-language model's tower and projector go to llama.cpp's mmproj file beside it
    (`<name>-mmproj.gguf`, mmproj.py), checked before either file is written."""
    calibrate = check_calibrate(quant, calibrate)
    config = export_config(model)
    arch = check_architecture(config)
    if tokenizer is None:
        raise ExportError("a GGUF needs the tokenizer (llama.cpp cannot run a file without its vocabulary)")
    if config.multimodal_type is not None:
        check_mmproj(config, getattr(tokenizer, "image_processor", None))
    vocabulary = gguf_tokenizer(tokenizer, config)
    tensors = plan_gguf(model, quant)
    if quant == DYNAMIC:
        tensors = dynamic_mix(model, tokenizer, config, tensors, calibration)

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
        statistics = LayerStatistics(model, tokenizer, calibration=calibration) if calibrate else None
        for t in track(tensors, len(tensors), f"GGUF {quant}" + (" (calibrated)" if calibrate else "")):
            writer.write_tensor_data(encode(t, statistics))
    writer.close()
    if config.multimodal_type is not None:
        save_mmproj(model, tokenizer, mmproj_path(out), quant, name=name)
    return out
