"""Reading PEFT adapter folders (`lora/peft_format.py` writes them): the base model named in
adapter_config.json, loaded with `load_model`, with the adapter applied.

Reading is strict: settings that would change the math and that we do not implement (per-module
rank/alpha patterns, fan_in_fan_out, LoRA biases, layer subsets, initialisations that rewrite the
base such as PiSSA) are refused with the key named, rather than loaded wrong. PEFT also saves the
full embedding/head weights (`...base_layer.weight`) when an embedding is targeted; those are
copied into the base, as PEFT does on load. Modules saved whole (`modules_to_save`,
lora/modules_to_save.py) are copied into the base too and stay trainable; an embedding saved with
more rows than the base has (new tokens) grows the model first, and the adapter folder's own
tokenizer, which holds those tokens, replaces the base's.

The base model is `base_model_name_or_path`: a path relative to the adapter folder when such a
file or folder exists there, else the name as given (absolute path, Hub id); null, or the default
model's GGUF file name at a path that does not exist here, mean the default model. An adapter
that carries `velotune_base.json` (it holds a 4-bit base's rounding error,
`lora_init: quant_error`) loads its base with those 4-bit options and refuses other 4-bit settings
with the key named.

This lives with the loaders, not with `lora/`: loading an adapter loads a model, and `lora/` sits
below the loaders in the import graph (the model's fused blocks use it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from velotune.errors import LoadError, read_json
from velotune.loaders import DEFAULT_MODEL_FILE, load_model
from velotune.lora.config import ALL_LINEAR, INITS, LoraConfig, LoraConfigError
from velotune.lora.model import apply_lora, lora_layers, lora_named_parameters
from velotune.lora.modules_to_save import EMBEDDING, module_tensors, saved_modules, train_in_full
from velotune.lora.peft_format import BASE_FILE, BASE_KEYS, BASE_SUFFIX, CONFIG_FILE, PREFIX, WEIGHTS_FILE
from velotune.models.vision_families import to_ours
from velotune.models.vocab import add_token_rows
from velotune.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"

# Keys whose non-default values change the computation in ways we do not implement.
UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "bias": ("none",),
    "fan_in_fan_out": (False,),
    "lora_bias": (False,),
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


def read_adapter_base(folder: Path) -> dict[str, Any] | None:
    """The `load_model` options of the base an adapter requires (BASE_FILE), or None."""
    path = folder / BASE_FILE
    if not path.is_file():
        return None
    data = read_json(path)
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


def read_adapter_config(path: Path) -> tuple[LoraConfig, str | None, list[str]]:
    """(LoraConfig, base_model_name_or_path, modules_to_save) from an adapter_config.json."""
    if not path.is_file():
        raise LoadError(f"{path}: no such file (a PEFT adapter folder needs {CONFIG_FILE})")
    data = read_json(path)
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
        if isinstance(targets, list):
            targets = [to_ours(t)[0] if isinstance(t, str) else t for t in targets]
        config = LoraConfig(r=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                            target_modules=targets, use_rslora=bool(data.get("use_rslora", False)),
                            use_dora=bool(data.get("use_dora", False)), init=init,
                            projector=bool(data.get("velotune_lora_projector", True)),
                            vision_tower=bool(data.get("velotune_lora_vision_tower", False)))
    except (LoraConfigError, TypeError) as err:
        raise LoadError(f"{path}: {err}") from None
    whole = data.get("modules_to_save") or []
    if not isinstance(whole, list) or not all(isinstance(name, str) for name in whole):
        raise LoadError(f"{path}: modules_to_save must be a list of module names, got {whole!r}")
    return config, data.get("base_model_name_or_path"), whole


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
    slots.update((name, param) for name, param in module_tensors(model, saved_modules(model)).items())
    bases = {f"{name}{BASE_SUFFIX}": layer for name, layer in lora_layers(model)}
    rank = getattr(getattr(model, "lora_config", None), "r", None)
    seen: set[str] = set()
    with torch.no_grad():
        for key, tensor in tensors.items():
            if not key.startswith(PREFIX):
                raise LoadError(f"{path}: tensor {key!r} does not start with {PREFIX!r} (not a PEFT adapter key)")
            name = to_ours(key[len(PREFIX):])[0]     # a vision-language model's nested names, ours
            if name in bases:
                copy_base_weight(bases[name], tensor, path, key)
                continue
            slot = slots.get(name)
            if slot is None:
                raise LoadError(f"{path}: tensor {key!r} matches no LoRA module or module to save of the model "
                                f"(target_modules and modules_to_save in {CONFIG_FILE} and the base model must agree)")
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


def grow_vocab(model: nn.Module, weights: Path) -> None:
    """Give the model the rows of a saved embedding that holds more tokens than the base (new
    tokens); their values come with the other saved tensors."""
    with safe_open(str(weights), "pt") as handle:
        key = f"{PREFIX}{EMBEDDING}.weight"
        if key in handle.keys():
            rows = handle.get_slice(key).get_shape()[0]
            if rows > model.config.vocab_size:
                add_token_rows(model, range(model.config.vocab_size, rows))


def resolve_base(name: str | None, folder: Path) -> str | Path | None:
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
    folder = Path(path)
    config, base_name, whole = read_adapter_config(folder / CONFIG_FILE)
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
    if (folder / TOKENIZER_FILE).is_file():      # new tokens were added: the adapter's tokenizer has them
        processor = getattr(tokenizer, "image_processor", None)
        tokenizer = Tokenizer.from_hf_folder(folder)
        tokenizer.image_processor = processor
    try:
        if whole:
            grow_vocab(model, weights)
        apply_lora(model, config)
        train_in_full(model, whole)
    except LoraConfigError as err:
        raise LoadError(f"{folder / CONFIG_FILE}: {err}") from None
    load_adapter_weights(model, weights)
    model.adapter_source = str(folder)
    if required is not None:
        model.adapter_base = required
    return model, tokenizer
