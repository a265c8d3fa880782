"""GGUF files (llama.cpp's format): metadata -> `ModelConfig`, tensors -> Hugging Face names.

Reading goes through gguf-py's `GGUFReader`, which memory-maps the file: nothing is unpickled
and nothing is read before it is asked for. `open_gguf` validates the whole file up front
(every tensor's type, byte range and shape), so a damaged or unsupported file fails before any
work; `tensors()` then dequantizes one tensor at a time, in file order, to float32.

The metadata is turned into a Hugging Face style config dict and handed to
`ModelConfig.from_hf_config`, so the GGUF and the safetensors loaders share one family mapping.

What llama.cpp's converter (convert_hf_to_gguf.py) changed on the way in, and is undone here:
  * llama (Mistral GGUFs also say "llama"): the rows of q/k (weights and biases) are permuted
    per head from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one. Qwen2,
    Qwen3, Gemma 2 and Phi-3 are written unpermuted.
  * gemma2: every RMSNorm weight is stored as w + 1 (llama.cpp multiplies by the stored weight);
    1 is subtracted here so the Hugging Face convention (scale by 1 + w) comes back.
  * phi3: fused `attn_qkv` and `ffn_up` (gate then up) keep Hugging Face's fused names
    (`qkv_proj`, `gate_up_proj`); the builder splits them.
  * Llama 3 RoPE scaling is stored only as a `rope_freqs.weight` tensor of per-frequency divisors.
    It is turned back into a `{"rope_type": "llama3", ...}` dict: the divisors fix the factor and
    the blend band, which fixes `low_freq_factor`/`high_freq_factor` once
    `original_max_position_embeddings` is chosen (any choice gives the same frequencies; the
    file's `rope.scaling.original_context_length` is used, else Llama 3's 8192). The fit is
    checked by recomputing the divisors; a tensor that is not of that form is refused.
  * Gemma 2 stores no `query_pre_attn_scalar`; like llama.cpp, the 46-layer (27B) model scales
    attention by hidden/heads and the others by head_dim.
  * gpt-oss: the sinks are `attn_sinks.weight`, the experts stacked with gate and up apart (and
    their biases likewise); YaRN is read with llama.cpp's rounded correction range (transformers'
    `truncate: true`; gpt-oss's own config says false, a difference llama.cpp itself makes).
Not supported, with an error naming it: Phi-3 "longrope" (`rope_factors_long/short` tensors),
`rope.scaling.type`s besides none/linear/yarn.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderField, quants

from velotune.errors import ConfigError, LoadError
from velotune.loaders.checkpoint import Checkpoint
from velotune.models.config import ModelConfig
from velotune.models.families import FAMILIES, GGUF_ARCHITECTURES, GGUF_BARE_PARAMETERS, GGUF_GLOBAL_NAMES

# Types llama.cpp commonly ships, all dequantized by gguf-py (MXFP4: gpt-oss's experts).
SUPPORTED_TYPES = frozenset(GGMLQuantizationType[n] for n in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"))

BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")

ROPE_FREQS = "rope_freqs.weight"                    # Llama 3 RoPE divisors
GEMMA3_LOCAL_ROPE_THETA = 10000.0                   # llama.cpp's fixed values for these families
SMOLLM3_NOPE_INTERVAL = 4
LONGROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
LLAMA3_ORIGINAL_CONTEXT = 8192


class CheckedGGUFReader(GGUFReader):
    """A GGUFReader that checks each tensor's type and byte range before it makes a view of it,
    so a truncated file is reported by tensor name instead of as a failed reshape.

    Hooks gguf-py's `_build_tensors` (an internal method, stable across gguf-py releases)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(path)

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        file_size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise LoadError(f"{self.path}: tensor {name!r} has unknown GGML type id {int(raw_type[0])}") from None
            if qtype not in SUPPORTED_TYPES:
                supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
                raise LoadError(f"{self.path}: tensor {name!r} has type {qtype.name}, which is not supported "
                                f"(supported: {supported})")
            block_size, block_bytes = GGML_QUANT_SIZES[qtype]
            shape = [int(d) for d in dims]
            if shape and shape[0] % block_size:
                raise LoadError(f"{self.path}: tensor {name!r} has rows of {shape[0]} values, not a multiple of "
                                f"the {qtype.name} block size {block_size}")
            start = start_offs + int(offset[0])
            end = start + math.prod(shape) // block_size * block_bytes
            if end > file_size:
                raise LoadError(f"{self.path}: file is truncated: tensor {name!r} needs bytes {start}..{end} "
                                f"but the file has {file_size} bytes")
        super()._build_tensors(start_offs, fields)


class Metadata:
    """Typed access to a reader's key/value fields; a missing required key names the file."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise LoadError(f"{self.path}: missing metadata key {key!r}")
        return self.reader.fields[key].contents()

    def count(self, key: str) -> int | None:
        """Length of an array field (without decoding its items)."""
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)


def read_file(path: Path) -> CheckedGGUFReader:
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        return CheckedGGUFReader(path)
    except LoadError:
        raise
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as exc:
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise LoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)") from None
        raise LoadError(f"{path}: damaged or truncated GGUF header ({type(exc).__name__}: {exc})") from None


def hf_name(gguf_name: str, family: str, num_layers: int, path: Path) -> str:
    if m := BLOCK_TENSOR.fullmatch(gguf_name):
        layer, part, kind = int(m[1]), m[2], m[3]
        table = FAMILIES[family].gguf_block_names()
        if part in table and layer < num_layers:
            if table[part] in GGUF_BARE_PARAMETERS and kind == "weight":
                return f"model.layers.{layer}.{table[part]}"
            return f"model.layers.{layer}.{table[part]}.{kind}"
    elif (m := GLOBAL_TENSOR.fullmatch(gguf_name)) and m[1] in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[m[1]]}.{m[2]}"
    raise LoadError(f"{path}: unexpected tensor {gguf_name!r} for a {family} model with {num_layers} layers")


def expected_shape(name: str, c: ModelConfig) -> tuple[int, ...] | None:
    """Hugging Face shape of a tensor under the config (None: not a tensor the config fixes)."""
    h, i, hd = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "qkv_proj": q + 2 * kv,
            "gate_proj": i, "up_proj": i, "gate_up_proj": 2 * i, "down_proj": h}
    cols = {"o_proj": q, "down_proj": i}
    parts = name.split(".")
    if ".experts." in name or ".router." in name:
        return None   # stacked expert tensors: the builder checks them (loaders/expert_tensors.py)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (c.vocab_size, h)
    if parts[-2] in rows:
        return (rows[parts[-2]], cols.get(parts[-2], h)) if parts[-1] == "weight" else (rows[parts[-2]],)
    if parts[-2] in ("q_norm", "k_norm"):
        return (hd,)
    if parts[-2].endswith("norm"):
        return (h,)
    return None


def hf_config(meta: Metadata, tensor_names: set[str], family: str, arch: str) -> dict[str, Any]:
    """The metadata spelled as a Hugging Face config.json."""
    p = f"{arch}."
    layers = int(meta.need(p + "block_count"))
    hidden = int(meta.need(p + "embedding_length"))
    heads = int(meta.need(p + "attention.head_count"))
    kv_heads = meta.get(p + "attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise LoadError(f"{meta.path}: per-layer {p}attention.head_count_kv {kv_heads} is not supported")
        kv_heads = kv_heads[0]
    head_dim = int(meta.get(p + "attention.key_length", hidden // heads))
    value_dim = int(meta.get(p + "attention.value_length", head_dim))
    if value_dim != head_dim:
        raise LoadError(f"{meta.path}: {p}attention.value_length={value_dim} differs from key_length={head_dim}")
    vocab = meta.get(p + "vocab_size") or meta.count("tokenizer.ggml.tokens")
    if vocab is None:
        raise LoadError(f"{meta.path}: missing metadata key {p + 'vocab_size'!r} (and no tokenizer.ggml.tokens "
                        "to count)")
    cfg: dict[str, Any] = {
        "model_type": family,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": int(meta.need(p + "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.need(p + "context_length")),
        "rms_norm_eps": float(meta.need(p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_down.bias" in tensor_names,
    }
    rotary = int(meta.get(p + "rope.dimension_count", head_dim))
    if rotary != head_dim:
        cfg["partial_rotary_factor"] = rotary / head_dim
    if (orig := meta.get(p + "rope.scaling.original_context_length")) is not None:
        cfg["original_max_position_embeddings"] = int(orig)
    scaling = meta.get(p + "rope.scaling.type", "none")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta.need(p + "rope.scaling.factor"))}
    elif scaling == "yarn":   # llama.cpp rounds the correction range outward: transformers' truncate=True
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": float(meta.need(p + "rope.scaling.factor")),
                               "original_max_position_embeddings":
                                   int(meta.need(p + "rope.scaling.original_context_length")),
                               "beta_fast": float(meta.get(p + "rope.scaling.yarn_beta_fast", 32.0)),
                               "beta_slow": float(meta.get(p + "rope.scaling.yarn_beta_slow", 1.0)), "truncate": True}
    elif scaling != "none":
        raise LoadError(f"{meta.path}: {p}rope.scaling.type={scaling!r} is not supported (none, linear, yarn, "
                        f"or Llama 3's {ROPE_FREQS} tensor)")
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        if (token_id := meta.get(f"tokenizer.ggml.{gguf_key}")) is not None:
            cfg[key] = int(token_id)
    if family == "gemma2":
        cfg["attn_logit_softcapping"] = float(meta.get(p + "attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = float(meta.get(p + "final_logit_softcapping", 30.0))
        cfg["sliding_window"] = int(meta.get(p + "attention.sliding_window", 4096))
        cfg["query_pre_attn_scalar"] = hidden // heads if layers == 46 else head_dim
    elif family == "gemma3_text":
        # llama.cpp fixes what Gemma 3 files do not say: one global layer in six, a local RoPE base
        # of 10,000, attention scaled by hidden/heads for the 62-layer (27B) model, else head_dim.
        if (window := meta.get(p + "attention.sliding_window")):
            cfg["sliding_window"] = int(window)
            cfg["rope_local_base_freq"] = GEMMA3_LOCAL_ROPE_THETA
        if (cap := meta.get(p + "final_logit_softcapping")):
            cfg["final_logit_softcapping"] = float(cap)
        cfg["query_pre_attn_scalar"] = hidden // heads if layers == 62 else head_dim
    elif family == "smollm3":
        cfg["no_rope_layer_interval"] = SMOLLM3_NOPE_INTERVAL
    elif family == "qwen3_moe":
        cfg.update(num_experts=int(meta.need(p + "expert_count")),
                   num_experts_per_tok=int(meta.need(p + "expert_used_count")),
                   moe_intermediate_size=int(meta.need(p + "expert_feed_forward_length")), norm_topk_prob=True)
    elif family == "gpt_oss":   # llama.cpp: every layer's experts, even layers sliding, biases throughout
        cfg.update(num_local_experts=int(meta.need(p + "expert_count")),
                   num_experts_per_tok=int(meta.need(p + "expert_used_count")),
                   intermediate_size=int(meta.need(p + "expert_feed_forward_length")), attention_bias=True)
        if (window := meta.get(p + "attention.sliding_window")):
            cfg["sliding_window"] = int(window)
    elif family == "phi3" and (window := meta.get(p + "attention.sliding_window")):
        cfg["sliding_window"] = int(window)
    return cfg


def llama3_rope_scaling(divisors: np.ndarray, theta: float, rotary_dim: int, original: int,
                        where: str) -> dict[str, Any] | None:
    """Recover Llama 3 `rope_scaling` from llama.cpp's per-frequency divisors.

    Between the two bands the divisor is 1 / ((1 - s) / factor + s) with
    s = (original / wavelen - low) / (high - low), i.e. s is linear in 1 / wavelen: a line fit
    through the blended frequencies gives low and high once `original` is fixed."""
    freqs = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if divisors.shape != freqs.shape:
        raise LoadError(f"{where}: has {divisors.size} values, expected {freqs.size} (rotary dims / 2)")
    r = divisors.astype(np.float64)
    if np.allclose(r, 1.0):
        return None  # divisors of 1: no scaling
    factor = float(r.max())
    blended = (r > 1 + 1e-6) & (r < factor - 1e-6)
    if blended.sum() < 2:
        raise LoadError(f"{where}: cannot be read as Llama 3 RoPE scaling (too few blended frequencies)")
    smooth = (1 / r[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(original * freqs[blended] / (2 * math.pi), smooth, 1)
    # smooth = x / (high - low) - low / (high - low), with x = original / wavelen
    span = 1 / slope
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(-intercept * span),
               "high_freq_factor": float((1 - intercept) * span), "original_max_position_embeddings": original}
    if not np.allclose(llama3_divisors(freqs, scaling), r, rtol=1e-4):
        raise LoadError(f"{where}: its values do not follow Llama 3 RoPE scaling")
    return scaling


def llama3_divisors(freqs: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    wavelen = 2 * math.pi / freqs
    low_len = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_len = s["original_max_position_embeddings"] / s["high_freq_factor"]
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    blended = 1 / ((1 - smooth) / s["factor"] + smooth)
    return np.where(wavelen < high_len, 1.0, np.where(wavelen > low_len, s["factor"], blended))


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of q/k (rotate-half order comes back)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(tensor: Any) -> np.ndarray:
    values = quants.dequantize(tensor.data, tensor.tensor_type)
    return np.array(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def open_gguf(path: str | Path) -> Checkpoint:
    path = Path(path)
    reader = read_file(path)
    meta = Metadata(reader, path)
    arch = meta.need("general.architecture")
    family = GGUF_ARCHITECTURES.get(arch)
    if family is None:
        raise LoadError(f"{path}: unknown architecture {arch!r} (general.architecture); "
                        f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    by_name = {t.name: t for t in reader.tensors}
    for name in LONGROPE_TENSORS:
        if name in by_name:
            raise LoadError(f"{path}: tensor {name!r}: Phi-3 'longrope' RoPE scaling is not supported")
    cfg = hf_config(meta, set(by_name), family, arch)
    if ROPE_FREQS in by_name:
        where = f"{path}: tensor {ROPE_FREQS!r}"
        rotary = int(cfg["head_dim"] * cfg.get("partial_rotary_factor", 1.0))
        original = cfg.get("original_max_position_embeddings", LLAMA3_ORIGINAL_CONTEXT)
        cfg["rope_scaling"] = llama3_rope_scaling(dequantize(by_name[ROPE_FREQS]), cfg["rope_theta"], rotary,
                                                  original, where)
    try:
        config = ModelConfig.from_hf_config(cfg, str(path))
    except ConfigError as exc:
        raise LoadError(str(exc)) from None

    names: list[tuple[str, Any]] = []
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = hf_name(t.name, family, config.num_hidden_layers, path)
        shape = tuple(int(d) for d in reversed(t.shape))
        want = expected_shape(name, config)
        if want is not None and shape != want:
            raise LoadError(f"{path}: tensor {t.name!r} ({name}) has shape {shape}, expected {want} from the config")
        names.append((name, t))

    row = FAMILIES[family]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in names:
            w = torch.from_numpy(dequantize(t))
            if row.gguf_qk_interleaved and ".self_attn.q_proj." in name:
                w = unpermute_rows(w, config.num_attention_heads)
            elif row.gguf_qk_interleaved and ".self_attn.k_proj." in name:
                w = unpermute_rows(w, config.num_key_value_heads)
            elif row.gguf_norm_shift and name.endswith("norm.weight"):
                w = w - row.gguf_norm_shift
            yield name, w

    tokenizer = None
    if "tokenizer.ggml.model" in meta:
        from velotune.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(reader, path)
    generation_config = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=str(path),
                      generation_config=generation_config)
