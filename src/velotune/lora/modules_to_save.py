"""Modules trained in full beside the LoRA adapters (`trainable_modules`; PEFT calls them
`modules_to_save`): the embeddings and the output head for continued pre-training or new tokens.

Such a module's weights become trainable float32 tensors (the optimizer's master copy, as
adapters are), and an adapter folder saves them whole under PEFT's keys
(`base_model.model.<module path>.weight`) with `modules_to_save` in adapter_config.json, which
`peft.PeftModel.from_pretrained` restores into its own copy of the module and
`velotune.load_model(adapter_dir)` copies into the base. A head tied to a trained embedding
(`tie_word_embeddings`) is the same tensor: it is saved under both names with
`ensure_weight_tying`, so PEFT restores both.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from velotune.lora.config import LoraConfigError
from velotune.lora.layers import LoraLayer

HEAD, EMBEDDING = "lm_head", "model.embed_tokens"


def matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def train_in_full(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Make the modules called `names` (full paths or trailing names, as target_modules) trainable
    in float32, after `apply_lora` froze the base; records their paths as `model.modules_to_save`
    and returns them."""
    paths = sorted(path for path, _ in model.named_modules() if path and any(matches(path, n) for n in names))
    for name in names:
        if not any(matches(path, name) for path in paths):
            raise LoraConfigError(f"trainable_modules: the model has no module called {name!r}")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer):
            raise LoraConfigError(f"trainable_modules: {path} also carries a LoRA adapter (target_modules); "
                                  "train it one way or the other")
        if not any(True for _ in module.parameters()):
            raise LoraConfigError(f"trainable_modules: {path} holds no weights")
        for param in module.parameters():
            param.data = param.data.float()     # a tied head shares this very tensor
            param.requires_grad_(True)
    model.modules_to_save = paths
    return paths


def saved_modules(model: nn.Module) -> list[str]:
    """The module paths an adapter folder saves whole: `model.modules_to_save`, plus the head when it
    is tied to a saved embedding."""
    paths = list(getattr(model, "modules_to_save", None) or [])
    if EMBEDDING in paths and HEAD not in paths and is_tied(model):
        paths.append(HEAD)
    return paths


def is_tied(model: nn.Module) -> bool:
    try:
        return model.get_submodule(HEAD).weight is model.get_submodule(EMBEDDING).weight
    except AttributeError:      # not a causal LM with both modules
        return False


def module_tensors(model: nn.Module, paths: Sequence[str]) -> dict[str, torch.Tensor]:
    """{"<path>.<parameter>": tensor} of the modules saved whole."""
    return {f"{path}.{name}": p.detach() for path in paths
            for name, p in model.get_submodule(path).named_parameters(recurse=False)}
