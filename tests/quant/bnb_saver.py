"""Writing a model whose projections are `Linear4bit` as a `*-bnb-4bit` Hugging Face folder, the
way transformers + bitsandbytes write one: only the tests need it (they check that transformers
reads our 4-bit layout), so it lives here rather than in the library."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from velotune.export.hf import DTYPE_NAMES, config_json
from velotune.quant.linear4bit import Linear4bit
from velotune.quant.serialization import state_to_tensors


def quantization_config(model: nn.Module, kept: Iterable[str]) -> dict[str, Any]:
    """config.json's quantization_config for `model`'s Linear4bit layers, as transformers writes
    it; `kept` names the linear layers that stay 16-bit (bitsandbytes must not touch them)."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("the model has no 4-bit layers to save")
    first = layers[0]
    for attribute in ("quant_type", "blocksize", "weight_dtype"):
        if any(getattr(m, attribute) != getattr(first, attribute) for m in layers):
            raise ValueError(f"the 4-bit layers differ in {attribute}; one quantization_config cannot describe them")
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type,
        "bnb_4bit_use_double_quant": first.nested_absmax_bits is not None,
        "bnb_4bit_compute_dtype": str(first.weight_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(set(kept) | {"lm_head"}),
    }


def save_4bit_hf(model: nn.Module, out: str | Path, tokenizer: Any = None) -> Path:
    """Write a model whose projections are `Linear4bit` as a bnb 4-bit HF folder (one
    model.safetensors, config.json, tokenizer files); returns the folder."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model carries LoRA adapters: save them with save_adapter, or merge them into "
                         "a 16-bit model; a 4-bit base cannot absorb them without requantizing")
    config = model.config
    if config.model_type == "phi3":
        raise ValueError("Phi-3 checkpoints fuse q/k/v and gate/up; separate 4-bit weights cannot be fused "
                         "without requantizing, so a Phi-3 model is not saved in 4-bit")
    tensors: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    dtypes: set[torch.dtype] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Linear4bit):
            tensors.update(state_to_tensors(f"{prefix}weight", module.packed, module.quant_state))
        elif isinstance(module, nn.Linear) and name != "lm_head":
            kept.append(name)
        for pname, param in module.named_parameters(recurse=False):
            if name == "lm_head" and config.tie_word_embeddings:
                continue
            tensors[f"{prefix}{pname}"] = param.detach()
            dtypes.add(param.dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.contiguous().cpu().clone() for k, v in tensors.items()}  # tables may share storage
    save_file(contiguous, str(out / "model.safetensors"), metadata={"format": "pt"})
    dtype = max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32
    cfg = config_json(config, dtype if dtype in DTYPE_NAMES else torch.float32)
    cfg["quantization_config"] = quantization_config(model, kept)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(out)
    return out
