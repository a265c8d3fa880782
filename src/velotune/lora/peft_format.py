"""PEFT's adapter folder, written: adapter_config.json + adapter_model.safetensors (reading it
is `loaders/adapter.py`, since reading loads a base model).

An adapter we save loads with `peft.PeftModel.from_pretrained` on the transformers model, and an
adapter PEFT saved loads here, because module paths equal Hugging Face's and tensors carry PEFT's
keys (`base_model.model.<module path>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`,
`.lora_embedding_A`, `.lora_embedding_B`); modules trained in full beside them
(lora/modules_to_save.py) are saved whole, as PEFT saves `modules_to_save`.

`save_adapter` writes an existing local base as an absolute path, a Hub id as given, and null for
the default model when given None.

Adapters that only hold on a 4-bit base (`lora_init: quant_error` starts them as that base's
rounding error, train/error_init.py; on the 16-bit base they would add it a second time) carry
`velotune_base.json`, the `load_model` options of that base (`model.adapter_base`).
`load_adapter` (loaders/adapter.py) then loads the base that way (every velotune reader, `velotune export` included,
so a merged export merges into the dequantized 4-bit base), and refuses other 4-bit settings with
the key named. PEFT does not read the file: with PEFT such an adapter belongs on the same
bitsandbytes NF4 base (double-quantized, blocksize 64), not on the 16-bit model.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from velotune.lora.config import LoraConfig, LoraConfigError
from velotune.lora.model import lora_layers, lora_state_dict
from velotune.lora.modules_to_save import HEAD, is_tied, module_tensors, saved_modules
from velotune.safetensors_file import save_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILE = "velotune_base.json"
BASE_KEYS = ("load_in_4bit", "quant_type", "keep_16bit", "keep_16bit_dynamic")
PREFIX = "base_model.model."
BASE_SUFFIX = ".base_layer.weight"

def base_name_for_config(base: str | Path | None) -> str | None:
    """An existing local path is written absolute (the adapter folder can move on its own);
    anything else (Hub id, None = the default model) as given."""
    if base is None:
        return None
    return str(Path(base).resolve()) if Path(base).exists() else str(base)


def peft_config(config: LoraConfig, base_model_name_or_path: str | Path | None,
                modules_to_save: list[str] | None = None, tied: bool = False) -> dict[str, Any]:
    """adapter_config.json; `modules_to_save` are paths of modules saved whole (PEFT lists their
    trailing names)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_for_config(base_model_name_or_path),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets()),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": config.init,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": sorted({path.rsplit(".", 1)[-1] for path in modules_to_save}) if modules_to_save else None,
        "ensure_weight_tying": bool(modules_to_save) and tied,
        "layers_to_transform": None,
        "layers_pattern": None,
        # vision-language models, written only where they differ from LoraConfig's defaults
        **({} if config.projector else {"velotune_lora_projector": False}),
        **({"velotune_lora_vision_tower": True} if config.vision_tower else {}),
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | Path | None,
                 names: Callable[[str], str] | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter folder; returns the folder. `names` maps our
    parameter names to the transformers model's where they differ (a vision-language model nests
    its decoder: models/vision_families.py); target_modules then lists every adapted module by
    that path, so PEFT adapts exactly these (a bare "q_proj" would reach into the vision tower)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise LoraConfigError("save_adapter: the model has no LoRA adapters (call apply_lora first)")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    whole, tied = saved_modules(model), is_tied(model)
    named = {**lora_state_dict(model), **module_tensors(model, whole)}
    rename = names or (lambda name: name)
    tensors = {PREFIX + rename(name): t.contiguous().cpu() for name, t in named.items()}
    head = f"{PREFIX}{HEAD}.weight"
    if tied and head in tensors:                 # safetensors stores no tensor twice
        tensors[head] = tensors[head].clone()
    save_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    settings = peft_config(config, base_model_name_or_path, whole, tied)
    if names is not None:
        settings["target_modules"] = sorted(rename(path) for path, _ in lora_layers(model))
    (folder / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    base = getattr(model, "adapter_base", None)
    if base is not None:
        (folder / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
    elif (folder / BASE_FILE).exists():       # a folder reused for an adapter of the plain base
        (folder / BASE_FILE).unlink()
    return folder
