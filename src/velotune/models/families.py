"""Every supported family as one row of data, read by the config reader, the loaders and the exporters.

A row says what a family's `config.json` switches on in `ModelConfig` (`quirks`), which Hugging Face
class writes it, and how llama.cpp stores it: the GGUF architecture name, the tensor names that
differ from the common llama ones, whether the converter interleaves q/k rows for its RoPE, and
whether norm weights are stored shifted by one. `loaders/gguf.py` and `export/gguf.py` read the
same row in opposite directions, so a family's GGUF layout is stated once.

Why rows and not classes: the decoder reads only `ModelConfig` fields; a family is the set of
field values its checkpoints imply, plus names. Adding a family is adding a row.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# llama.cpp block tensor part -> module path inside a decoder layer, common to every family.
GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SANDWICH_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                  "post_ffw_norm": "post_feedforward_layernorm"}
MOE_NAMES = {"ffn_gate_inp": "mlp.router", "ffn_gate_exps": "mlp.experts.gate_proj",
             "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"}
# Parameters that are not a module's weight, stored in GGUF as "<name>.weight" (gpt-oss's sinks).
GGUF_BARE_PARAMETERS = ("self_attn.sinks",)

Quirks = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def _none(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    return {}


def _llama(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    bias = bool(cfg.get("attention_bias"))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias")), sliding_window=None)


def _qwen2(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    return dict(qkv_bias=True, **({} if cfg.get("use_sliding_window") else {"sliding_window": None}))


def _qwen3(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    bias = bool(cfg.get("attention_bias"))
    return dict(qk_norm=True, qkv_bias=bias, o_bias=bias,
                **({} if cfg.get("use_sliding_window") else {"sliding_window": None}))


def _gemma(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    return dict(norm_weight_offset=1.0, sandwich_norms=True, embedding_multiplier=math.sqrt(kw["hidden_size"]),
                attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
                final_logit_softcapping=cfg.get("final_logit_softcapping"),
                query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                hidden_act=cfg.get("hidden_activation") or "gelu_pytorch_tanh")


def _gemma2(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    # Gemma 2 alternates: even layers slide, odd layers see everything.
    pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kw["num_hidden_layers"])]
    return dict(_gemma(cfg, kw), default_layer_types=pattern)


def _gemma3(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    # Gemma 3: five sliding layers, then one global (`sliding_window_pattern`, 6), q/k norms, a
    # local RoPE base of its own for the sliding layers (unscaled) and the global one for the rest.
    every = int(cfg.get("sliding_window_pattern") or 6)
    pattern = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
               for i in range(kw["num_hidden_layers"])]
    return dict(_gemma(cfg, kw), qk_norm=True, default_layer_types=pattern,
                qkv_bias=bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")))


def _smollm3(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    # SmolLM3: every `no_rope_layer_interval`-th layer (4) has no rotary embedding (NoPE).
    layers = kw["num_hidden_layers"]
    interval = int(cfg.get("no_rope_layer_interval") or 4)
    flags = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    out: dict[str, Any] = _llama(cfg, kw)
    out["no_rope_layers"] = [int(f) for f in flags]
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        out["sliding_window"] = cfg["sliding_window"]
    return out


def _qwen3_moe(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    every = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    sparse = [int(i not in dense and (i + 1) % every == 0) for i in range(kw["num_hidden_layers"])]
    return dict(_qwen3(cfg, kw), num_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
                num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=sparse,
                router_aux_loss_coef=_aux_coef(cfg))


def _aux_coef(cfg: dict[str, Any]) -> float:
    """The load-balancing loss weight, as transformers applies it: only with output_router_logits."""
    return float(cfg.get("router_aux_loss_coef", 0.001)) if cfg.get("output_router_logits") else 0.0


def _gpt_oss(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    # gpt-oss: biased attention with a learned sink logit per head, sliding layers alternating
    # with full ones, a biased router whose top-k logits are softmaxed (not the other way round),
    # biased experts with a clamped SwiGLU.
    pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kw["num_hidden_layers"])]
    bias = bool(cfg.get("attention_bias", True))
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts"))
    return dict(qkv_bias=bias, o_bias=bias, attention_sinks=True, default_layer_types=pattern,
                num_experts=experts, num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_intermediate_size=kw["intermediate_size"], moe_layers=[1] * kw["num_hidden_layers"],
                router_bias=True, expert_bias=True, router_softmax_after_topk=True,
                hidden_act="swiglu_clamped", swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                swiglu_limit=float(cfg.get("swiglu_limit", 7.0)), router_aux_loss_coef=_aux_coef(cfg))


@dataclass(frozen=True)
class Family:
    model_type: str                      # Hugging Face `model_type`
    architecture: str                    # Hugging Face `architectures[0]`
    quirks: Quirks = _none               # config.json -> ModelConfig fields beyond the common ones
    tie_by_default: bool = False         # tie_word_embeddings when config.json does not say
    gguf_arch: str | None = None         # llama.cpp `general.architecture`; None: no GGUF
    gguf_names: dict[str, str] = field(default_factory=dict)   # overrides of GGUF_BLOCK_NAMES
    gguf_qk_interleaved: bool = False    # llama.cpp's converter interleaves q/k rows per head
    gguf_norm_shift: float = 0.0         # GGUF stores RMSNorm weights as w + shift
    gguf_untied_head: bool = False       # llama.cpp needs output.weight even when the head is tied
    fused_checkpoint: bool = False       # checkpoints fuse q/k/v and gate/up (the builder splits them)
    # Mixture of experts in Hugging Face checkpoints: "per_expert" (experts.{e}.gate_proj/up_proj/
    # down_proj.weight) or "interleaved" (stacked [E, in, out], gate and up alternating); the
    # router's module name under `mlp`. loaders/expert_tensors.py reads and writes both.
    hf_experts: str | None = None
    hf_router: str = "router"

    def gguf_block_names(self) -> dict[str, str]:
        return {**GGUF_BLOCK_NAMES, **self.gguf_names}


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", _llama, gguf_arch="llama", gguf_qk_interleaved=True),
    # Mistral (7B, Nemo, Small 3: explicit head_dim) is written as llama.cpp's "llama", like its converter does.
    Family("mistral", "MistralForCausalLM", gguf_arch="llama", gguf_qk_interleaved=True),
    Family("qwen2", "Qwen2ForCausalLM", _qwen2, gguf_arch="qwen2"),
    Family("qwen3", "Qwen3ForCausalLM", _qwen3, gguf_arch="qwen3"),
    Family("gemma2", "Gemma2ForCausalLM", _gemma2, tie_by_default=True, gguf_arch="gemma2",
           gguf_names=SANDWICH_NAMES, gguf_norm_shift=1.0),
    Family("gemma3_text", "Gemma3ForCausalLM", _gemma3, tie_by_default=True, gguf_arch="gemma3",
           gguf_names=SANDWICH_NAMES, gguf_norm_shift=1.0),
    # Phi-3 and Phi-4 (same layout, model_type phi3).
    Family("phi3", "Phi3ForCausalLM", gguf_arch="phi3",
           gguf_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}, fused_checkpoint=True),
    Family("smollm3", "SmolLM3ForCausalLM", _smollm3, tie_by_default=True, gguf_arch="smollm3",
           gguf_qk_interleaved=True),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe, gguf_arch="qwen3moe", gguf_names=MOE_NAMES,
           hf_experts="per_expert", hf_router="gate"),
    # gpt-oss: llama.cpp's "gpt-oss" names its post-attention norm post_attention_norm (no ffn_norm)
    Family("gpt_oss", "GptOssForCausalLM", _gpt_oss, gguf_arch="gpt-oss", hf_experts="interleaved", gguf_untied_head=True,
           gguf_names={**MOE_NAMES, "post_attention_norm": "post_attention_layernorm", "attn_sinks": "self_attn.sinks"}),
)}
# Hugging Face `architectures` entries we accept, mapped to their family.
ARCHITECTURES = {f.architecture: f.model_type for f in FAMILIES.values()}
# llama.cpp `general.architecture` -> family read from such a file (Mistral GGUFs say "llama").
GGUF_ARCHITECTURES = {f.gguf_arch: f.model_type for f in reversed(FAMILIES.values()) if f.gguf_arch}
