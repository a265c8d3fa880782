"""Model-level LoRA: put adapters in, take their parameters out, merge, switch them off.

Design choices:
- `apply_lora` replaces the targeted modules in place (module paths keep their names, so PEFT's
  keys map one to one), freezes every base parameter and records the config on the model as
  `model.lora_config` for `save_adapter`.
- Tied embeddings (SmolLM2, Gemma 2, ...): targeting `lm_head` adapts the output head only. The
  shared weight is frozen and never written by training, so the embedding does not change. Merging
  such a head gives it a private merged copy and sets `config.tie_word_embeddings` to False (an
  export must then write the head); unmerging puts the shared weight and the flag back.
- `disable_adapters` is how DPO gets its reference model without a second copy: the same modules
  with every adapter switched off, per-expert ones included (a merged model is unmerged for the
  duration).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from velotune.lora.config import EMBEDDING, MLP_PROJECTIONS, LoraConfig, LoraConfigError
from velotune.lora.experts import LoraExperts
from velotune.lora.layers import LoraEmbedding, LoraLayer, LoraLinear


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def apply_lora(model: nn.Module, config: LoraConfig, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap every module that `config.target_modules` selects; adapters take `dtype`
    (default: the base weight's dtype). Returns the same model."""
    if any(True for _ in lora_layers(model)):
        raise LoraConfigError("apply_lora: the model already has LoRA adapters")
    targets = config.targets()
    for param in model.parameters():
        param.requires_grad_(False)
    found: set[str] = set()
    experts: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix) for prefix in experts):
            continue   # the 4-bit experts' own storage modules are not layers to adapt
        if getattr(module, "stacked_experts", False):
            experts.append(name + ".")
        if getattr(module, "stacked_experts", False) and config.matches_experts(name):
            parent_name, _, short = name.rpartition(".")
            setattr(model.get_submodule(parent_name), short, LoraExperts(module, config, dtype))
            found.update(t for t in targets if t in (*MLP_PROJECTIONS, "experts"))
            continue
        if not config.matches(name):
            continue
        parent_name, _, short = name.rpartition(".")
        setattr(model.get_submodule(parent_name), short, wrap(name, module, config, dtype))
        found.update(t for t in targets if name == t or name.endswith("." + t))
    missing = sorted(set(targets) - found)
    if missing:
        raise LoraConfigError(f"LoraConfig.target_modules: {missing} match no module of this "
                              f"{type(model).__name__}")
    model.lora_config = config
    return model


def wrap(name: str, module: nn.Module, config: LoraConfig, dtype: torch.dtype | None) -> LoraLayer:
    if name.endswith(EMBEDDING):
        if not isinstance(module, nn.Embedding):
            raise LoraConfigError(f"{name}: expected an nn.Embedding, got {type(module).__name__}")
        return LoraEmbedding(module, config, dtype)
    if not all(hasattr(module, attr) for attr in ("in_features", "out_features")):
        raise LoraConfigError(f"{name}: cannot put LoRA on a {type(module).__name__} (not a linear layer)")
    return LoraLinear(module, config, dtype)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (A, B and DoRA magnitudes), in module order."""
    return [p for _, p in lora_named_parameters(model)]


def lora_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter parameter; names are PEFT's saved keys without the
    `base_model.model.` prefix."""
    for name, layer in model.named_modules():
        if not isinstance(layer, (LoraLayer, LoraExperts)):
            continue
        for pname, param in layer.named_parameters():
            if not pname.startswith("base_layer."):
                yield f"{name}.{pname}", param


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (detached) by `lora_named_parameters` name."""
    return {name: p.detach() for name, p in lora_named_parameters(model)}


def merged_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) in float32 of a LoRA linear layer with its adapter merged, computed without
    changing the layer; None when `module` is not a LoRA linear layer."""
    if not isinstance(module, LoraLinear):
        return None
    bias = getattr(module.base_layer, "bias", None)
    return module.merged_weight(torch.float32), None if bias is None else bias.detach().float()


def merge_lora(model: nn.Module) -> nn.Module:
    """Write every adapter into its base weight (in place); the forward then skips the adapters."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    untied = False
    for _, layer in lora_layers(model):
        weight = getattr(layer.base_layer, "weight", None)
        shared = isinstance(weight, nn.Parameter) and uses[id(weight)] > 1
        layer.merge(shared_weight=shared)
        untied |= shared
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        model._lora_untied_embeddings = True
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: base weights back to their values before the merge (within rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    if getattr(model, "_lora_untied_embeddings", False):
        model.config.tie_word_embeddings = True
        del model._lora_untied_embeddings
    return model


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in lora_layers(model))


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base model (adapters off)."""
    layers = [m for m in model.modules() if isinstance(m, (LoraLayer, LoraExperts))]
    merged = is_merged(model)
    if merged:
        unmerge_lora(model)
    previous = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.adapters_enabled = enabled
        if merged:
            merge_lora(model)
