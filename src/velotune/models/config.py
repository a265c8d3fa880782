"""ModelConfig: every family's quirks as plain fields of one dataclass.

The decoder in `transformer.py` reads only these fields; it never asks which family it is.
Adding a family means adding a branch to `from_hf_config` (and a name table for the loaders),
never a new model class. Field names follow Hugging Face's where one exists, so a reader of a
`config.json` recognises them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from velotune.errors import ConfigError

# Families the decoder supports, keyed by Hugging Face's `model_type`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")

# Hugging Face `architectures` entries we accept, mapped to their model_type.
ARCHITECTURE_TO_MODEL_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
}


@dataclass
class ModelConfig:
    """Shape and quirks of a decoder-only transformer.

    Attributes mirror Hugging Face config keys where they exist. `layer_types` holds, for each
    layer, "full_attention" or "sliding_attention"; `sliding_window` applies to the latter.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3" | "linear", "factor": ..., ...} as in config.json.
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False              # Qwen2: bias on q/k/v only; Llama attention_bias: q/k/v/o
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False               # Qwen3: per-head RMSNorm on q and k before RoPE
    hidden_act: str = "silu"            # "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU-tanh)
    norm_weight_offset: float = 0.0     # Gemma: RMSNorm scales by (1 + w)
    sandwich_norms: bool = False        # Gemma 2: norms after attention and after the MLP too
    embedding_multiplier: float = 1.0   # Gemma: embeddings scaled by sqrt(hidden_size)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None  # Gemma 2: attention scale is this ** -0.5
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # The config.json this was read from, kept so that exports can write it back faithfully.
    source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown architecture {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention" and self.sliding_window is not None

    def num_parameters(self, embeddings: bool = True) -> int:
        """Parameter count from shapes alone (used by the memory estimator and MFU)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        norms = h * (4 if self.sandwich_norms else 2) + (2 * hd if self.qk_norm else 0)
        total = self.num_hidden_layers * (attn + mlp + norms) + h
        if embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    # ------------------------------------------------------------------ reading config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], path: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face `config.json` dict; `path` only names the file in errors."""
        model_type = cfg.get("model_type")
        if model_type is None:
            archs = cfg.get("architectures") or []
            model_type = next((ARCHITECTURE_TO_MODEL_TYPE[a] for a in archs if a in ARCHITECTURE_TO_MODEL_TYPE), None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{path}: unknown architecture (model_type={cfg.get('model_type')!r}, "
                f"architectures={cfg.get('architectures')!r}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"{path}: missing key {key!r}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        rope_theta, rope_scaling = _read_rope(cfg, path)
        kw: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "gemma2")),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            source=dict(cfg),
        )
        sliding = cfg.get("sliding_window")
        if model_type == "llama":
            kw.update(qkv_bias=bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")),
                      mlp_bias=bool(cfg.get("mlp_bias")))
            sliding = None
        elif model_type == "mistral":
            pass
        elif model_type == "qwen2":
            kw.update(qkv_bias=True)
            if not cfg.get("use_sliding_window", False):
                sliding = None
        elif model_type == "qwen3":
            kw.update(qk_norm=True, qkv_bias=bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")))
            if not cfg.get("use_sliding_window", False):
                sliding = None
        elif model_type == "gemma2":
            kw.update(norm_weight_offset=1.0, sandwich_norms=True, embedding_multiplier=math.sqrt(hidden),
                      attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
                      final_logit_softcapping=cfg.get("final_logit_softcapping"),
                      query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"))
            kw["hidden_act"] = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        elif model_type == "phi3":
            kw.update(o_bias=False)
        if kw["hidden_act"] in ("gelu_pytorch_tanh", "gelu_tanh"):
            kw["hidden_act"] = "gelu_pytorch_tanh"
        elif kw["hidden_act"] != "silu":
            raise ConfigError(f"{path}: unsupported hidden_act {kw['hidden_act']!r} (silu or gelu_pytorch_tanh)")
        kw["sliding_window"] = int(sliding) if sliding else None
        layer_types = cfg.get("layer_types")
        if layer_types and kw["sliding_window"]:
            kw["layer_types"] = list(layer_types)
        elif model_type == "gemma2" and kw["sliding_window"]:
            # Gemma 2 alternates: even layers slide, odd layers see everything.
            kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                 for i in range(kw["num_hidden_layers"])]
        return cls(**kw)


def _read_rope(cfg: dict[str, Any], path: str) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling, from either transformers 4 (`rope_theta`, `rope_scaling`) or
    transformers 5 (`rope_parameters`) spelling."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type dicts (v5)
        params = params["full_attention"]
    scaling = dict(params) if isinstance(params, dict) else (dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None)
    theta = float((params or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if scaling is not None:
        scaling.pop("rope_theta", None)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return theta, None
        if kind not in ("llama3", "linear"):
            raise ConfigError(f"{path}: rope scaling type {kind!r} is not supported (default, linear, llama3)")
        scaling["rope_type"] = kind
    return theta, scaling
