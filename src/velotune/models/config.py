"""ModelConfig: every family's quirks as plain fields of one dataclass.

The decoder in `transformer.py` reads only these fields; it never asks which family it is.
Adding a family means adding a row to `families.py` (what its config.json switches on, and its
GGUF names), never a new model class. Field names follow Hugging Face's where one exists, so a
reader of a `config.json` recognises them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from velotune.errors import ConfigError
from velotune.models.families import ARCHITECTURES, FAMILIES
from velotune.models.vision import VisionConfig
from velotune.models.vision_families import VISION_ARCHITECTURES, VISION_FAMILIES, image_token_id

# Families the decoder supports, keyed by Hugging Face's `model_type`.
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# Hugging Face `architectures` entries we accept, mapped to their model_type.
ARCHITECTURE_TO_MODEL_TYPE = ARCHITECTURES
# Activations of the GLU: SwiGLU, GeGLU-tanh, and gpt-oss's clamped SwiGLU ((up + 1) * clamped swish).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "swiglu_clamped")


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
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: attention scale is this ** -0.5
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    local_rope_theta: float | None = None   # Gemma 3: sliding layers' own RoPE base (and no scaling)
    no_rope_layers: list[int] = field(default_factory=list)  # SmolLM3: 0 = no RoPE in that layer (NoPE)
    attention_sinks: bool = False       # gpt-oss: a learned logit per head joins every softmax
    # Mixture of experts (Qwen3-MoE, gpt-oss); num_experts 0 = dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: list[int] = field(default_factory=list)   # 1 = that layer's MLP is the experts
    norm_topk_prob: bool = True         # Qwen3-MoE: the k chosen probabilities renormalised to sum 1
    router_softmax_after_topk: bool = False   # gpt-oss: softmax over the top-k logits only
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_alpha: float = 1.702         # gpt-oss clamped SwiGLU: gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0           # ... gate clamped above, up clamped both ways at this
    router_aux_loss_coef: float = 0.0   # load-balancing loss weight added to the training loss
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Vision-language models (models/vision_families.py): the tower and projector, the family
    # (`multimodal_type`, e.g. "llava"; model_type stays the decoder's) and the placeholder id
    # whose embeddings the projected image features replace.
    vision: VisionConfig | None = None
    multimodal_type: str | None = None
    image_token_id: int | None = None
    bidirectional_images: bool = False     # Gemma 3: an image's tokens see each other both ways
    # Qwen2.5-VL's M-RoPE: the rotary frequencies split into temporal, height and width sections
    # (counts of frequencies, summing to rotary_dim / 2), each turned by its own position id
    # (models/vision_grid.py:mrope_positions); text tokens carry three equal ids.
    mrope_section: list[int] | None = None
    # The config.json this was read from, kept so that exports can write it back faithfully.
    source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown architecture {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if isinstance(self.vision, dict):   # a config rebuilt from `to_dict`
            self.vision = VisionConfig(**self.vision)
        self.check_mrope()
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.no_rope_layers and len(self.no_rope_layers) != self.num_hidden_layers:
            raise ConfigError(
                f"no_rope_layers has {len(self.no_rope_layers)} entries for {self.num_hidden_layers} layers"
            )
        if self.num_experts and not self.moe_layers:
            self.moe_layers = [1] * self.num_hidden_layers
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                              f"{self.num_experts}")
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

    def check_mrope(self, where: str = "") -> None:
        """M-RoPE's sections must split the rotary frequencies (half the rotary dimension) exactly."""
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.rotary_dim:
            raise ConfigError(f"{where}mrope_section {self.mrope_section} does not cover half the rotary "
                              f"dimension {self.rotary_dim}")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention" and self.sliding_window is not None

    def rope_kind(self, layer: int) -> str | None:
        """Which rotary table a layer uses: "global", "local" (Gemma 3's sliding layers) or None (NoPE)."""
        if self.no_rope_layers and not self.no_rope_layers[layer]:
            return None
        if self.local_rope_theta is not None and self.layer_types[layer] == "sliding_attention":
            return "local"
        return "global"

    @property
    def varlen_attention(self) -> bool:
        """Whether packed documents can go to variable-length attention (kernels.varlen_attention):
        not with soft-capped scores or attention sinks, which need explicit attention and a mask."""
        return self.attn_logit_softcapping is None and not self.attention_sinks

    def is_moe(self, layer: int) -> bool:
        return bool(self.num_experts and self.moe_layers[layer])

    def num_parameters(self, embeddings: bool = True) -> int:
        """Parameter count from shapes alone (used by the memory estimator and MFU); a
        vision-language model's tower and projector included."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        if self.attention_sinks:
            attn += self.num_attention_heads
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        e, mi = self.num_experts, self.moe_intermediate_size
        experts = e * 3 * h * mi + e * h + (e * (2 * mi + h) if self.expert_bias else 0) + (e if self.router_bias else 0)
        norms = h * (4 if self.sandwich_norms else 2) + (2 * hd if self.qk_norm else 0)
        moe = sum(1 for i in range(self.num_hidden_layers) if self.is_moe(i))
        total = self.num_hidden_layers * (attn + norms) + moe * experts + (self.num_hidden_layers - moe) * mlp + h
        if embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total + (self.vision.num_parameters() if self.vision is not None else 0)

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
            model_type = next((ARCHITECTURE_TO_MODEL_TYPE[a] for a in archs if a in ARCHITECTURE_TO_MODEL_TYPE),
                              next((VISION_ARCHITECTURES[a] for a in archs if a in VISION_ARCHITECTURES), None))
        if model_type in VISION_FAMILIES:
            return cls.from_vision_language_config(cfg, model_type, path)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{path}: unknown architecture (model_type={cfg.get('model_type')!r}, "
                f"architectures={cfg.get('architectures')!r}); supported: "
                f"{', '.join((*SUPPORTED_MODEL_TYPES, *VISION_FAMILIES))}"
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
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            source=dict(cfg),
        )
        family = FAMILIES[model_type]
        kw["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", family.tie_by_default))
        kw["sliding_window"] = cfg.get("sliding_window")
        kw["local_rope_theta"] = _local_rope_theta(cfg, path)
        quirks = family.quirks(cfg, kw)
        default_layer_types = quirks.pop("default_layer_types", None)
        kw.update(quirks)
        if kw["hidden_act"] in ("gelu_pytorch_tanh", "gelu_tanh"):
            kw["hidden_act"] = "gelu_pytorch_tanh"
        elif kw["hidden_act"] not in ACTIVATIONS:
            raise ConfigError(f"{path}: unsupported hidden_act {kw['hidden_act']!r} (silu or gelu_pytorch_tanh)")
        kw["sliding_window"] = int(kw["sliding_window"]) if kw["sliding_window"] else None
        layer_types = cfg.get("layer_types") or default_layer_types
        if layer_types and kw["sliding_window"]:
            kw["layer_types"] = list(layer_types)
        return cls(**kw)


    @classmethod
    def from_vision_language_config(cls, cfg: dict[str, Any], model_type: str, path: str) -> ModelConfig:
        """A vision-language config.json: the decoder from `text_config` (its family's own reader),
        the tower and projector from the family row (models/vision_families.py)."""
        family = VISION_FAMILIES[model_type]
        text = cfg.get("text_config")
        if text is None and family.text_aliases:   # the Hub's Qwen2.5-VL configs keep the decoder's keys at the top
            text = {k: v for k, v in cfg.items() if k not in ("vision_config", "architectures")}
        if not isinstance(text, dict):
            raise ConfigError(f"{path}: a {model_type} config needs a text_config")
        text = {"model_type": family.text_model_type, **text}
        text["model_type"] = dict(family.text_aliases).get(text["model_type"], text["model_type"])
        if "tie_word_embeddings" in cfg and "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        mrope = _pop_mrope(text) if family.mrope else None
        config = cls.from_hf_config(text, f"{path} text_config")
        if family.mrope:
            config.mrope_section = mrope or [16, 24, 24]   # transformers' default
            config.check_mrope(f"{path}: ")
        config.vision = family.vision_config(cfg, config.hidden_size, path)
        config.multimodal_type = model_type
        config.image_token_id = image_token_id(cfg, family)
        config.bidirectional_images = family.bidirectional_images
        if not 0 <= config.image_token_id < config.vocab_size:
            raise ConfigError(f"{path}: image_token_id {config.image_token_id} is outside the vocabulary "
                              f"of {config.vocab_size}")
        config.source = dict(cfg)
        return config


def _pop_mrope(text: dict[str, Any]) -> list[int] | None:
    """M-RoPE's sections out of a text config's rope settings (transformers 5's `rope_parameters`
    or 4's `rope_scaling` of type "mrope"), leaving the plain RoPE they scale nothing of."""
    for key in ("rope_parameters", "rope_scaling"):
        params = text.get(key)
        if isinstance(params, dict) and "mrope_section" in params:
            params = dict(params)
            section = [int(n) for n in params.pop("mrope_section")]
            if params.get("type") == "mrope" or params.get("rope_type") == "mrope":
                params.pop("type", None)
                params["rope_type"] = "default"
            text[key] = params
            return section
    return None


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
        if kind not in ("llama3", "linear", "yarn"):
            raise ConfigError(f"{path}: rope scaling type {kind!r} is not supported (default, linear, llama3, yarn)")
        scaling["rope_type"] = kind
        if kind == "yarn":
            scaling.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    return theta, scaling


def _local_rope_theta(cfg: dict[str, Any], path: str) -> float | None:
    """Gemma 3's RoPE base for sliding layers: `rope_parameters["sliding_attention"]` (transformers
    5) or `rope_local_base_freq` (4); None where the sliding layers share the global base."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
        local = params["sliding_attention"]
        if local.get("rope_type", "default") != "default":
            raise ConfigError(f"{path}: rope_parameters.sliding_attention: only unscaled RoPE is supported there")
        return float(local.get("rope_theta", 10000.0))
    if cfg.get("rope_local_base_freq") is not None:
        return float(cfg["rope_local_base_freq"])
    return None
