"""LoRA, rsLoRA and DoRA adapters on the model core, saved and loaded in PEFT's format.

`apply_lora(model, LoraConfig(...))` wraps the targeted layers and freezes the rest;
`lora_parameters` are what the optimizer trains; `merge_lora`/`unmerge_lora` fold adapters into
the base weights and back; `disable_adapters(model)` runs the base model; `save_adapter` writes
a PEFT adapter folder and `velotune.load_model(adapter_dir)` reads one (`loaders/adapter.py`).
"""
from velotune.lora.config import ALL_LINEAR, LoraConfig, LoraConfigError
from velotune.lora.layers import LoraEmbedding, LoraLayer, LoraLinear, LoraStateError
from velotune.lora.model import (
    apply_lora,
    disable_adapters,
    is_merged,
    lora_layers,
    lora_named_parameters,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    merged_linear,
    unmerge_lora,
)
from velotune.lora.peft_format import save_adapter

__all__ = [
    "ALL_LINEAR", "LoraConfig", "LoraConfigError", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraStateError",
    "apply_lora", "disable_adapters", "is_merged", "lora_layers", "lora_named_parameters", "lora_parameters",
    "lora_state_dict", "merge_lora", "merged_linear", "unmerge_lora",
    "save_adapter",
]
