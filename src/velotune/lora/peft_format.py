"""PEFT's adapter folder: adapter_config.json + adapter_model.safetensors, both ways.

An adapter we save loads with `peft.PeftModel.from_pretrained` on the transformers model, and an
adapter PEFT saved loads here, because module paths equal Hugging Face's and tensors carry PEFT's
keys (`base_model.model.<module path>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`,
`.lora_embedding_A`, `.lora_embedding_B`).

Reading is strict: settings that would change the math and that we do not implement (per-module
rank/alpha patterns, fan_in_fan_out, LoRA biases, modules_to_save, layer subsets, initialisations
that rewrite the base such as PiSSA) are refused with the key named, rather than loaded wrong.
PEFT also saves the full embedding/head weights (`...base_layer.weight`) when an embedding is
targeted; those are copied into the base, as PEFT does on load.

The base model of `load_adapter` is `base_model_name_or_path`: a path relative to the adapter
folder when such a file or folder exists there, else the name as given (absolute path, Hub id);
null, or the default model's GGUF file name at a path that does not exist here, mean the default
model. `save_adapter` writes an existing local base as an absolute path, a Hub id as given, and
null for the default model when given None.

Adapters that only hold on a 4-bit base (`lora_init: quant_error` starts them as that base's
rounding error, quant/error_init.py; on the 16-bit base they would add it a second time) carry
`velotune_base.json`, the `load_model` options of that base (`model.adapter_base`).
`load_adapter` then loads the base that way (every velotune reader, `velotune export` included,
so a merged export merges into the dequantized 4-bit base), and refuses other 4-bit settings with
the key named. PEFT does not read the file: with PEFT such an adapter belongs on the same
bitsandbytes NF4 base (double-quantized, blocksize 64), not on the 16-bit model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from velotune.loaders.checkpoint import LoadError
from velotune.lora.config import ALL_LINEAR, INITS, LoraConfig, LoraConfigError
from velotune.lora.model import apply_lora, lora_layers, lora_named_parameters, lora_state_dict
from velotune.safetensors_file import save_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILE = "velotune_base.json"
BASE_KEYS = ("load_in_4bit", "quant_type", "keep_16bit", "keep_16bit_dynamic")
PREFIX = "base_model.model."
BASE_SUFFIX = ".base_layer.weight"

# Keys whose non-default values change the computation in ways we do not implement.
UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "bias": ("none",),
    "fan_in_fan_out": (False,),
    "lora_bias": (False,),
    "modules_to_save": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None,),
    "exclude_modules": (None, []),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "layer_replication": (None,),
    "use_qalora": (False,),
    "use_bdlora": (None, False),
}


def base_name_for_config(base: str | Path | None) -> str | None:
    """An existing local path is written absolute (the adapter folder can move on its own);
    anything else (Hub id, None = the default model) as given."""
    if base is None:
        return None
    return str(Path(base).resolve()) if Path(base).exists() else str(base)


def peft_config(config: LoraConfig, base_model_name_or_path: str | Path | None) -> dict[str, Any]:
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
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | Path | None) -> Path:
    """Write the model's adapters as a PEFT adapter folder; returns the folder."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise LoraConfigError("save_adapter: the model has no LoRA adapters (call apply_lora first)")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + name: t.contiguous().cpu() for name, t in lora_state_dict(model).items()}
    save_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config(config, base_model_name_or_path), indent=2) + "\n")
    base = getattr(model, "adapter_base", None)
    if base is not None:
        (folder / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
    elif (folder / BASE_FILE).exists():       # a folder reused for an adapter of the plain base
        (folder / BASE_FILE).unlink()
    return folder


def read_adapter_base(folder: Path) -> dict[str, Any] | None:
    """The `load_model` options of the base an adapter requires (BASE_FILE), or None."""
    path = folder / BASE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LoadError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or data.get("load_in_4bit") is not True:
        raise LoadError(f"{path}: expected an object with load_in_4bit: true")
    unknown = sorted(set(data) - set(BASE_KEYS))
    if unknown:
        raise LoadError(f"{path}: unknown key(s) {unknown}; expected {list(BASE_KEYS)}")
    return data


def base_options_for(required: dict[str, Any], options: dict[str, Any], path: Path) -> dict[str, Any]:
    """`options` for load_model with the base `required` filled in. A plain call (no 4-bit asked
    for) gets the required base; a 4-bit request with other settings is refused."""
    if not options.get("load_in_4bit"):
        return {**options, **required}
    for key in BASE_KEYS[1:]:
        asked = options.get(key)
        if asked is not None and key in required and asked != required[key]:
            raise LoadError(f"{path}: this adapter was made for a 4-bit base with {key} = {required[key]!r}, "
                            f"but {key} = {asked!r} was asked for (its adapters hold that base's rounding error)")
    return {**options, **required}


def read_adapter_config(path: Path) -> tuple[LoraConfig, str | None]:
    """(LoraConfig, base_model_name_or_path) from an adapter_config.json."""
    if not path.is_file():
        raise LoadError(f"{path}: no such file (a PEFT adapter folder needs {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LoadError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise LoadError(f"{path}: peft_type {peft_type!r} is not supported (only 'LORA')")
    if data.get("task_type") not in (None, "CAUSAL_LM"):
        raise LoadError(f"{path}: task_type {data['task_type']!r} is not supported (only 'CAUSAL_LM')")
    for key, defaults in UNSUPPORTED_DEFAULTS.items():
        if key in data and data[key] not in defaults:
            raise LoadError(f"{path}: {key} = {data[key]!r} is not supported (expected {defaults[0]!r})")
    init = data.get("init_lora_weights", True)
    if init not in INITS:
        raise LoadError(f"{path}: init_lora_weights {init!r} is not supported (it changes the base weights)")
    targets = data.get("target_modules")
    if not targets:
        raise LoadError(f"{path}: target_modules is missing or empty")
    if isinstance(targets, str) and targets != ALL_LINEAR:
        raise LoadError(f"{path}: target_modules {targets!r} is a regular expression; only a list of "
                        f"module names or {ALL_LINEAR!r} is supported")
    try:
        config = LoraConfig(r=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                            target_modules=targets, use_rslora=bool(data.get("use_rslora", False)),
                            use_dora=bool(data.get("use_dora", False)), init=init)
    except (LoraConfigError, TypeError) as err:
        raise LoadError(f"{path}: {err}") from None
    return config, data.get("base_model_name_or_path")


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Copy an adapter_model.safetensors into a model that `apply_lora` prepared with the same
    config. Every adapter tensor must be present with its exact shape."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file (a PEFT adapter folder needs {WEIGHTS_FILE})")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise LoadError(f"{path}: not a readable safetensors file ({err})") from None
    slots = dict(lora_named_parameters(model))
    bases = {f"{name}{BASE_SUFFIX}": layer for name, layer in lora_layers(model)}
    rank = getattr(getattr(model, "lora_config", None), "r", None)
    seen: set[str] = set()
    with torch.no_grad():
        for key, tensor in tensors.items():
            if not key.startswith(PREFIX):
                raise LoadError(f"{path}: tensor {key!r} does not start with {PREFIX!r} (not a PEFT adapter key)")
            name = key[len(PREFIX):]
            if name in bases:
                copy_base_weight(bases[name], tensor, path, key)
                continue
            slot = slots.get(name)
            if slot is None:
                raise LoadError(f"{path}: tensor {key!r} matches no LoRA module of the model "
                                f"(target_modules in {CONFIG_FILE} and the base model must agree)")
            if tuple(tensor.shape) != tuple(slot.shape):
                raise LoadError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                                f"{tuple(slot.shape)} (r={rank} in {CONFIG_FILE})")
            slot.copy_(tensor)
            seen.add(name)
    missing = sorted(set(slots) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(PREFIX + m for m in missing[:3]) + more
        raise LoadError(f"{path}: missing adapter tensors {shown}")


def copy_base_weight(layer: nn.Module, tensor: torch.Tensor, path: Path, key: str) -> None:
    weight = getattr(layer.base_layer, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise LoadError(f"{path}: tensor {key!r} replaces a base weight, but that layer has none to replace")
    if tuple(tensor.shape) != tuple(weight.shape):
        raise LoadError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the base model's is "
                        f"{tuple(weight.shape)}")
    weight.copy_(tensor)


def resolve_base(name: str | None, folder: Path) -> str | Path | None:
    from velotune.loaders import DEFAULT_MODEL_FILE

    if name is None:
        return None
    local = folder / name
    if local.exists():
        return local
    if Path(name).name == DEFAULT_MODEL_FILE and not Path(name).exists():
        return None
    return name


def load_adapter(path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 max_seq_length: int | None = None, **base_options: Any):
    """(model, tokenizer): the base model named in adapter_config.json with the adapter applied.
    `base_options` go to `load_model` for the base (load_in_4bit, keep_16bit, ...)."""
    from velotune.loaders import load_model

    folder = Path(path)
    config, base_name = read_adapter_config(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise LoadError(f"{weights}: no such file (a PEFT adapter folder needs {WEIGHTS_FILE})")
    required = read_adapter_base(folder)
    if required is not None:
        base_options = base_options_for(required, base_options, folder / BASE_FILE)
    base = resolve_base(base_name, folder)
    if base is not None and Path(base).resolve() == folder.resolve():
        raise LoadError(f"{folder / CONFIG_FILE}: base_model_name_or_path names the adapter folder itself")
    model, tokenizer = load_model(base, dtype=dtype, device=device, max_seq_length=max_seq_length, **base_options)
    try:
        apply_lora(model, config)
    except LoraConfigError as err:
        raise LoadError(f"{folder / CONFIG_FILE}: {err}") from None
    load_adapter_weights(model, weights)
    model.adapter_source = str(folder)
    if required is not None:
        model.adapter_base = required
    return model, tokenizer
