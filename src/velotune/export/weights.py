"""The tensors an export writes: Hugging Face names and shapes up front, values on demand.

`plan_tensors(model)` lists every tensor of the merged model (names as in a Hugging Face
checkpoint, Phi-3's q/k/v and gate/up fused back into `qkv_proj`/`gate_up_proj`, experts and
router in the family's checkpoint layout, no `lm_head` when the head is tied to the embedding)
with its shape, and a `read()` that computes its value only when the writer gets to it;
`plan_tensors(model, "gguf")` keeps the experts stacked with gate and up apart, as llama.cpp
stores them (`loaders/expert_tensors.stored_parts` states both layouts). Writers can therefore lay out a whole file (safetensors shard
plan, GGUF tensor table) before any weight is touched, and hold one tensor at a time after.

What `read()` returns is the weight the model effectively computes with:
- a plain `nn.Linear`: its weight;
- a 4-bit base (`Linear4bit`, QLoRA): dequantized to float32 first;
- a LoRA/DoRA layer: base + adapter, merged by `velotune.lora` in float32, one layer at a
  time, without touching the live model (so nothing needs unmerging afterwards and a bf16 base
  never rounds twice);
- stacked experts: W_e + s B_e A_e per expert with per-expert adapters, a 4-bit base dequantized,
  once per layer for all of that layer's expert tensors.
The canonical names and shapes come from a `Transformer` built on the meta device from the
model's config, so a wrapped or quantized layer cannot change what the file holds. One exception
(`export_config`): a tied head whose embedding or head carries an adapter is written untied.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from velotune.export.errors import ExportError
from velotune.loaders.expert_tensors import stored_parts
from velotune.lora import LoraLayer, merged_linear
from velotune.models.config import ModelConfig
from velotune.models.moe import Router
from velotune.models.transformer import Transformer
from velotune.quant import Linear4bit

# Phi-3 keeps these fused in its checkpoints; the model holds them apart.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_FAMILIES = ("phi3",)


@dataclass(frozen=True)
class PlannedTensor:
    name: str                                  # Hugging Face name
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]           # float32 CPU value, computed when called


def effective_linear(module: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) in float32 of a linear layer as the model uses it: merged adapter, dequantized
    base."""
    merged = merged_linear(module)
    if merged is not None:
        weight, bias = merged
    elif isinstance(module, Linear4bit):
        weight, bias = module.dequantized_weight(torch.float32), module.bias
    elif isinstance(module, (nn.Linear, Router)):
        weight, bias = module.weight, module.bias
    else:
        raise ExportError(f"{where}: cannot export a {type(module).__name__} layer (expected a linear, "
                          "4-bit linear or LoRA layer)")
    return weight.detach().float().cpu(), None if bias is None else bias.detach().float().cpu()


def effective_experts(module: nn.Module, where: str) -> dict[str, torch.Tensor | None]:
    """A layer's stacked expert parameters (our names) in float32 as the kernels compute with
    them: per-expert adapters merged, a 4-bit base dequantized."""
    if not callable(getattr(module, "computed", None)):
        raise ExportError(f"{where}: cannot export a {type(module).__name__} as experts")
    experts = module.computed()
    weights = {}
    for name, weight, lora in (("gate_up_proj", experts.weights()[0], experts.gate_up_lora),
                               ("down_proj", experts.weights()[1], experts.down_lora)):
        weight = weight.detach().float().cpu()
        if lora is not None:
            weight = weight + lora.scale * torch.bmm(lora.b.detach().float().cpu(), lora.a.detach().float().cpu())
        weights[name] = weight
    for name, bias in (("gate_up_proj_bias", experts.gate_up_bias), ("down_proj_bias", experts.down_bias)):
        weights[name] = None if bias is None else bias.detach().float().cpu()
    return weights


def export_config(model: Transformer) -> ModelConfig:
    """The config of what is exported. A tied head whose embedding or head carries an adapter no
    longer equals the embedding once merged, so it is written as a head of its own."""
    config = model.config
    adapted = isinstance(model.model.embed_tokens, LoraLayer) or isinstance(model.lm_head, LoraLayer)
    if config.tie_word_embeddings and adapted:
        return dataclasses.replace(config, tie_word_embeddings=False)
    return config


def canonical_layout(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Name -> shape of every parameter of this config, and the module paths of its linear
    layers (routers included)."""
    with torch.device("meta"):
        reference = Transformer(config)
    shapes = {name: tuple(p.shape) for name, p in reference.named_parameters()}  # tied head listed once
    linears = {name for name, m in reference.named_modules() if isinstance(m, (nn.Linear, Router))}
    return shapes, linears


def parameter(model: Transformer, name: str) -> torch.Tensor:
    """A non-linear weight (embedding, norm), with an embedding adapter merged."""
    path = name.rsplit(".", 1)[0]
    module = model.get_submodule(path)
    if isinstance(module, LoraLayer):
        return module.merged_weight(torch.float32).detach().cpu()
    return model.get_parameter(name).detach().float().cpu()


def plan_tensors(model: Transformer, layout: str = "hf") -> list[PlannedTensor]:
    """`layout`: "hf" (the family's checkpoint) or "gguf" (experts as llama.cpp stacks them)."""
    config = export_config(model)
    shapes, linears = canonical_layout(config)
    family = model.config.model_type
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    expert_cache: dict[str, dict[str, torch.Tensor | None]] = {}

    def linear_part(path: str, kind: str) -> torch.Tensor:
        # weight and bias of one layer are read back to back: merge once, hand out both
        if path not in cache:
            cache.clear()
            cache[path] = effective_linear(model.get_submodule(path), path)
        value = cache[path][0 if kind == "weight" else 1]
        if value is None:
            raise ExportError(f"{path}: the config calls for a {kind} but the layer has none")
        return value

    def expert_part(path: str, kind: str) -> torch.Tensor:
        # all of a layer's expert tensors come from one merge of its experts
        if path not in expert_cache:
            expert_cache.clear()
            expert_cache[path] = effective_experts(model.get_submodule(path), path)
        value = expert_cache[path][kind]
        if value is None:
            raise ExportError(f"{path}: the config calls for {kind} but the experts have none")
        return value

    def reader(name: str) -> Callable[[], torch.Tensor]:
        path, kind = name.rsplit(".", 1)
        if path in linears:
            return lambda: linear_part(path, kind)
        if path.endswith(".mlp.experts"):
            return lambda: expert_part(path, kind)
        return lambda: parameter(model, name)

    planned: list[PlannedTensor] = []
    fused_done: set[str] = set()
    for name, shape in shapes.items():
        path, kind = name.rsplit(".", 1)
        module = path.rsplit(".", 1)[-1]
        fused = next((f for f, parts in FUSED.items() if module in parts), None)
        if family in FUSED_FAMILIES and fused is not None:
            parent = path.rsplit(".", 1)[0]
            fused_name = f"{parent}.{fused}.{kind}"
            if fused_name in fused_done:
                continue
            fused_done.add(fused_name)
            part_names = [f"{parent}.{part}.{kind}" for part in FUSED[fused]]
            rows = sum(shapes[p][0] for p in part_names)
            readers = [reader(p) for p in part_names]
            planned.append(PlannedTensor(fused_name, (rows, *shape[1:]),
                                         lambda rs=readers: torch.cat([r() for r in rs], dim=0)))
            continue
        read = reader(name)
        for part_name, part_shape, convert in stored_parts(config, name, shape, layout):
            planned.append(PlannedTensor(part_name, part_shape, lambda r=read, f=convert: f(r())))
    return planned
