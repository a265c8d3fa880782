"""A few published model configs, bundled so that `velotune estimate` works offline, and
`load_config`, which finds a model's config by folder, file, bundled name or Hub id.

Each entry is the Hub repository it was copied from and the shape-relevant keys of its
`config.json`, numbers as published; `ModelConfig.from_hf_config` reads them like any other
config. Names are matched case-insensitively.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from velotune.errors import ConfigError
from velotune.models.config import ModelConfig

_LLAMA3_ROPE_8B = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-3-8B": {
        "hub_id": "meta-llama/Meta-Llama-3-8B",
        "config": {
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
        },
    },
    "Llama-3.1-8B": {
        "hub_id": "meta-llama/Llama-3.1-8B",
        "config": {
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": _LLAMA3_ROPE_8B, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 128000, "eos_token_id": 128001,
        },
    },
    "Llama-3.1-70B": {
        "hub_id": "meta-llama/Llama-3.1-70B",
        "config": {
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": _LLAMA3_ROPE_8B, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 128000, "eos_token_id": 128001,
        },
    },
    "Llama-3.2-1B": {
        "hub_id": "meta-llama/Llama-3.2-1B",
        "config": {
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {**_LLAMA3_ROPE_8B, "factor": 32.0}, "tie_word_embeddings": True,
            "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
        },
    },
    "Mistral-7B": {
        "hub_id": "mistralai/Mistral-7B-v0.3",
        "config": {
            "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
            "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2,
        },
    },
    "Qwen2.5-7B": {
        "hub_id": "Qwen/Qwen2.5-7B",
        "config": {
            "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28,
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
        },
    },
    "Gemma-2-9B": {
        "hub_id": "google/gemma-2-9b",
        "config": {
            "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
            "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "tie_word_embeddings": True,
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        },
    },
    "Phi-3-mini": {
        "hub_id": "microsoft/Phi-3-mini-4k-instruct",
        "config": {
            "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "sliding_window": 2047, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
        },
    },
    "Qwen3-8B": {
        "hub_id": "Qwen/Qwen3-8B",
        "config": {
            "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
        },
    },
    "Qwen3-30B-A3B": {
        "hub_id": "Qwen/Qwen3-30B-A3B",
        "config": {
            "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 151643, "eos_token_id": 151645,
        },
    },
    "gpt-oss-20b": {
        "hub_id": "openai/gpt-oss-20b",
        "config": {
            "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
            "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128, "attention_bias": True,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "original_max_position_embeddings": 4096, "truncate": False},
            "swiglu_limit": 7.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "eos_token_id": 200002, "pad_token_id": 199999,
        },
    },
}


def known_config(name: str) -> tuple[str, dict[str, Any]] | None:
    """(canonical name, entry) for `name` in any letter case, or None."""
    for canonical, entry in KNOWN_CONFIGS.items():
        if canonical.lower() == name.lower():
            return canonical, entry
    return None


def load_config(model: str) -> tuple[ModelConfig, str]:
    """The config of `model` and where it came from. `model` is a folder holding config.json, a
    config.json file, a name from the bundled table (`KNOWN_CONFIGS`), or a Hub id (online)."""
    path = Path(model)
    if path.exists():
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{path}: no config.json in this folder")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        return ModelConfig.from_hf_config(data, str(file)), str(file)
    found = known_config(model)
    if found is not None:
        name, entry = found
        return ModelConfig.from_hf_config(entry["config"], f"bundled config {name}"), f"{name} ({entry['hub_id']}, bundled)"
    if "/" in model:
        return _hub_config(model)
    close = difflib.get_close_matches(model.lower(), [n.lower() for n in KNOWN_CONFIGS], n=3, cutoff=0.4)
    names = {n.lower(): n for n in KNOWN_CONFIGS}
    hint = f" Did you mean {' or '.join(names[c] for c in close)}?" if close else ""
    raise ConfigError(f"unknown model {model!r}: not a local path, a Hub id (owner/name) or a known name."
                        f"{hint} Known: {', '.join(KNOWN_CONFIGS)}")


def _hub_config(repo_id: str) -> tuple[ModelConfig, str]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise ConfigError(f"{repo_id}: reading a Hub id needs huggingface_hub (pip install velotune[hub])") from exc
    try:
        file = hf_hub_download(repo_id, "config.json")
    except Exception as exc:  # offline, network, gated, missing repo: all end the same way for the user
        raise ConfigError(f"{repo_id}: cannot fetch config.json from the Hugging Face Hub "
                            f"({type(exc).__name__}: {exc}). Offline, pass a local folder or a known name "
                            f"({', '.join(KNOWN_CONFIGS)})") from exc
    with open(file, encoding="utf-8") as f:
        return ModelConfig.from_hf_config(json.load(f), f"{repo_id}/config.json"), f"{repo_id} (Hub)"
