"""AWQ and GPTQ exports: 4-bit weights (W4A16) in the compressed-tensors layout vLLM and transformers load.

    export("runs/chat", to="awq")                      # zero-point grids (w4a16_asym), group 128
    export("runs/chat", to="gptq", quant="w4a16")      # symmetric grids, GPTQ rounding alone

The folder is the merged Hugging Face folder (`hf.py`: config.json, tokenizer, generation
config) with every decoder linear replaced by its packed 4-bit form (`packing.py`); embeddings,
norms, biases and the head stay in the model's 16-bit dtype (the head is in `ignore`, as
llm-compressor leaves it).

How: calibration rows (the run's own training rows when the caller passes them, else generic
chat text) go through the model one decoder layer at a time (`models/calibration.py`); for each
layer, H = X^T X of every linear's input, then, as the method's `Recipe` says:
- AWQ scales: per input channel scales searched on H for each set of linears reading one input
  (q/k/v, gate/up, down from up, o from v -- the v row a head's o columns read, so grouped-query
  heads share one scale), folded into the producer: the norm's weight (its offset kept, Gemma's
  1 + w), the rows (and bias) of up_proj or v_proj. Only exact rewrites are made, so the 16-bit
  model computes the same function;
- rounding: GPTQ under H (`w4a16.gptq`), in act order, or round-to-nearest with the clipping
  search on H's diagonal blocks.
--to awq is AWQ's scales followed by GPTQ's rounding (the combination llm-compressor's recipes
use), --to gptq GPTQ alone; plain min/max round-to-nearest (`rtn`) is the benchmark's baseline.
Sequential calibration: the next layer's input is the output of this layer as the folder holds
it (`LayerQuantizer.quantized_layer`), so each layer's rounding also corrects for the error the
layers before it made. Phi-3's fused qkv/gate_up are quantized per part and joined (rows), as the
packing allows.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velotune.export.errors import ExportError
from velotune.export.hf import (DEFAULT_SHARD_BYTES, config_json, shard_plan, weight_files, write_index,
                                write_sidecars)
from velotune.export.packing import pack_columns, pack_rows, quantization_config
from velotune.export.progress import track
from velotune.export.w4a16 import Quantized, awq_scales, diagonal_blocks, gptq, rtn
from velotune.export.weights import FUSED, FUSED_FAMILIES, effective_linear, export_config, parameter, plan_tensors
from velotune.models.calibration import (calibration_ids, is_decoder_linear, layer_arguments,
                                         run_with_input_statistics)
from velotune.models.transformer import Transformer
from velotune.safetensors_file import save_safetensors

# scheme name (compressed-tensors' preset names) -> symmetric grids
SCHEMES = {"w4a16": True, "w4a16_asym": False}
DEFAULT_SCHEME = {"awq": "w4a16_asym", "gptq": "w4a16_asym"}
BASELINE = "rtn"      # plain min/max round-to-nearest, written the same way: what the benchmark compares with


@dataclass(frozen=True)
class Recipe:
    """How a method chooses the 4-bit weights of a layer."""
    awq: bool                  # activation-aware scales, folded into each input's producer
    gptq: bool                 # GPTQ rounding (else round-to-nearest)
    clip: bool = True          # each group's range searched for the lowest H-weighted error (else min/max)
    act_order: bool = False    # GPTQ visits the columns loudest input first
    sequential: bool = False   # each layer calibrated on the outputs of the 4-bit layers before it


RECIPES = {"awq": Recipe(awq=True, gptq=True, act_order=True, sequential=True),
           "gptq": Recipe(awq=False, gptq=True, act_order=True, sequential=True),
           BASELINE: Recipe(awq=False, gptq=False, clip=False)}
GROUP_SIZES = (128, 64, 32)   # the default: the largest that divides every width (vLLM's kernels take these)
IGNORED = ["lm_head"]


def check_model(model: Transformer, group_size: int | None) -> int:
    """Before anything is computed: a dense model whose every decoder linear is whole groups
    wide; the group size (None: the largest of GROUP_SIZES that fits)."""
    config = export_config(model)
    if config.num_experts:
        raise ExportError(f"{config.model_type}: AWQ/GPTQ export of mixture-of-experts models is not supported "
                          "(export --to hf or gguf)")
    if group_size is not None and group_size <= 0:
        raise ExportError(f"group size must be a positive number of input columns, got {group_size}")
    widths = {name: effective_in_features(module) for name, module in model.model.layers[0].named_modules()
              if is_decoder_linear(name, module)}
    common = math.gcd(*widths.values())
    fits = [g for g in GROUP_SIZES if common % g == 0]
    if group_size is None and not fits:
        raise ExportError(f"no group size of {', '.join(map(str, GROUP_SIZES))} divides the input widths "
                          f"{sorted(set(widths.values()))}; give --group-size (a divisor of {common})")
    for name, width in widths.items():
        if group_size is not None and width % group_size:
            raise ExportError(f"group size {group_size} does not divide the input width {width} of "
                              f"model.layers.*.{name}; " + (f"--group-size {fits[0]} divides every width"
                              if fits else f"every width is a multiple of {common}"))
    return group_size or fits[0]


def effective_in_features(module: nn.Module) -> int:
    base = getattr(module, "base_layer", module)
    return int(base.in_features)


def storage_dtype(model: Transformer) -> torch.dtype:
    """Scales and unquantized tensors: the checkpoint's 16-bit dtype, else bfloat16."""
    source = export_config(model).source or {}
    name = source.get("torch_dtype") or source.get("dtype")
    return torch.float16 if name == "float16" else torch.bfloat16


def _producers(layer: nn.Module, config: Any) -> list[tuple[str, list[str], torch.Tensor | None]]:
    """(what makes the input, the linears reading it, consumer column -> producer channel) of the
    AWQ scale sets of one decoder layer."""
    mlp_norm = "pre_feedforward_layernorm" if getattr(layer, "sandwich", False) else "post_attention_layernorm"
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    column = torch.arange(heads * head_dim)
    v_row = (column // head_dim) // (heads // kv_heads) * head_dim + column % head_dim
    return [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None),
            (mlp_norm, ["mlp.gate_proj", "mlp.up_proj"], None),
            ("mlp.up_proj", ["mlp.down_proj"], None),
            ("self_attn.v_proj", ["self_attn.o_proj"], v_row)]


class LayerQuantizer:
    """Quantizes the decoder layers one by one; keeps the packed linears and the 16-bit tensors
    AWQ rewrote (norms, producer biases), by Hugging Face name."""

    def __init__(self, model: Transformer, recipe: Recipe, symmetric: bool, group_size: int, dtype: torch.dtype):
        self.model, self.recipe, self.symmetric, self.group, self.dtype = model, recipe, symmetric, group_size, dtype
        self.config = export_config(model)
        self.quantized: dict[str, Quantized] = {}          # linear path -> 4-bit weight
        self.replaced: dict[str, torch.Tensor] = {}        # HF name -> float32 value

    def layer(self, index: int, hessians: dict[str, torch.Tensor]) -> None:
        layer = self.model.model.layers[index]
        prefix = f"model.layers.{index}."
        device = next(iter(hessians.values())).device
        linears = {path: [t if t is None else t.to(device) for t in effective_linear(layer.get_submodule(path),
                                                                                      prefix + path)]
                   for path in hessians}
        recipe = self.recipe
        if recipe.awq:
            self._fold_scales(layer, prefix, linears, hessians)
        for path, (weight, bias) in linears.items():
            h = hessians[path]
            if recipe.gptq:
                q = gptq(weight, h, self.group, self.symmetric, self.dtype, act_order=recipe.act_order)
            elif recipe.clip:
                q = rtn(weight, self.group, self.symmetric, self.dtype, diagonal_blocks(h, self.group))
            else:
                q = rtn(weight, self.group, self.symmetric, self.dtype, shrinks=(1.0,))
            self.quantized[prefix + path] = Quantized(q.codes.cpu(), q.scale.cpu(), None if q.zero is None else
                                                      q.zero.cpu())
            if bias is not None:
                self.replaced[f"{prefix}{path}.bias"] = bias.cpu()

    def _fold_scales(self, layer: nn.Module, prefix: str, linears: dict[str, list], hessians: dict[str, torch.Tensor]
                     ) -> None:
        for producer, consumers, expand in _producers(layer, self.config):
            if any(c not in linears for c in consumers):
                raise ExportError(f"{prefix}{consumers[0]}: no calibration input reached it")
            h = hessians[consumers[0]]
            if expand is None:
                s = awq_scales([linears[c][0] for c in consumers], h, self.group, self.symmetric, self.dtype)
                s_producer = s
            else:
                s_producer = self._grouped_scales(linears[consumers[0]][0], h, expand.to(h.device))
                s = s_producer[expand.to(h.device)]
            for c in consumers:
                linears[c][0] = linears[c][0] * s[None, :]
                hessians[c] = hessians[c] / s.double()[:, None] / s.double()[None, :]
            if producer in linears:                      # a linear's rows (and bias) divided by s
                weight, bias = linears[producer]
                linears[producer] = [weight / s_producer[:, None], None if bias is None else bias / s_producer]
            else:                                        # a norm: (offset + w) / s - offset
                norm = layer.get_submodule(producer)
                name = f"{prefix}{producer}.weight"
                w = parameter(self.model, name).to(s_producer.device)
                self.replaced[name] = ((w + norm.offset) / s_producer - norm.offset).cpu()

    def _grouped_scales(self, weight: torch.Tensor, h: torch.Tensor, expand: torch.Tensor) -> torch.Tensor:
        """AWQ scales for o_proj, one per v_proj row: the search runs on o's columns with the
        scale of the v row each column reads (heads sharing a kv head share it)."""
        channels = int(expand.max()) + 1
        diag = torch.diagonal(h).float().clamp(min=0)
        pooled = torch.zeros(channels, device=h.device).index_add_(0, expand, diag)
        pooled = pooled / torch.bincount(expand, minlength=channels).float()
        s = awq_scales([weight], h, self.group, self.symmetric, self.dtype, pooled[expand].sqrt())
        # s is a function of the pooled magnitudes alone, so columns of one v row got one value
        return torch.zeros(channels, device=h.device).index_copy_(0, expand, s.float())

    def quantized_layer(self, index: int) -> nn.Module:
        """A copy of decoder layer `index` computing with its 4-bit weights (dequantized), the
        tensors AWQ rewrote, and every tensor rounded to the storage dtype: what a reader of the
        folder runs."""
        prefix = f"model.layers.{index}."
        layer = copy.deepcopy(self.model.model.layers[index])
        dtype = next(layer.parameters()).dtype
        for name, q in self.quantized.items():
            if not name.startswith(prefix):
                continue
            path = name[len(prefix):]
            parent, child = path.rsplit(".", 1)
            old = layer.get_submodule(path)
            device = next(old.parameters()).device
            bias = self.replaced.get(f"{name}.bias")
            linear = nn.Linear(q.codes.shape[1], q.codes.shape[0], bias=bias is not None, device=device, dtype=dtype)
            linear.weight.copy_(q.dequantized())
            if bias is not None:
                linear.bias.copy_(bias)
            setattr(layer.get_submodule(parent), child, linear)
        for name, value in self.replaced.items():
            if name.startswith(prefix) and not name.endswith("_proj.bias"):
                layer.get_parameter(name[len(prefix):]).copy_(value)
        for p in layer.parameters():                     # the folder's 16-bit tensors
            p.copy_(p.to(self.dtype).to(p.dtype))
        return layer


def quantize_layers(model: Transformer, tokenizer: Any, recipe: Recipe, symmetric: bool, group_size: int,
                    dtype: torch.dtype, calibration: tuple[torch.Tensor, torch.Tensor] | None,
                    label: str = "W4A16") -> LayerQuantizer:
    if calibration is None:
        if tokenizer is None:
            raise ExportError("AWQ/GPTQ calibration needs the tokenizer (for generic text) or calibration rows")
        calibration = calibration_ids(tokenizer)
    ids, positions = calibration
    args = layer_arguments(model, ids, positions)
    hidden = args[0][0]
    quantizer = LayerQuantizer(model, recipe, symmetric, group_size, dtype)
    layers = model.model.layers
    for index in track(range(len(layers)), len(layers), f"{label} layers"):
        out, hessians = run_with_input_statistics(layers[index], hidden, args[index], is_decoder_linear,
                                                  torch.float64)
        quantizer.layer(index, hessians)
        if recipe.sequential:
            out = quantizer.quantized_layer(index)(hidden, *args[index][1:])
        hidden = out
    return quantizer


def _join(parts: Sequence[Quantized]) -> Quantized:
    zeros = [p.zero for p in parts]
    return Quantized(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                     None if zeros[0] is None else torch.cat(zeros))   # type: ignore[arg-type]


def output_tensors(model: Transformer, quantizer: LayerQuantizer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, by name, in the family's checkpoint order."""
    family = model.config.model_type
    tensors: dict[str, torch.Tensor] = {}
    for t in plan_tensors(model):
        path, kind = t.name.rsplit(".", 1)
        parent, module = path.rsplit(".", 1) if "." in path else ("", path)
        parts = [f"{parent}.{p}" for p in FUSED[module]] if family in FUSED_FAMILIES and module in FUSED else [path]
        if kind == "weight" and all(p in quantizer.quantized for p in parts):
            q = _join([quantizer.quantized[p] for p in parts])
            tensors[f"{path}.weight_packed"] = pack_rows(q.codes)
            tensors[f"{path}.weight_scale"] = q.scale.contiguous()
            if q.zero is not None:
                tensors[f"{path}.weight_zero_point"] = pack_columns(q.zero)
            tensors[f"{path}.weight_shape"] = torch.tensor(t.shape, dtype=torch.int64)
            continue
        names = [f"{p}.{kind}" for p in parts]
        if all(n in quantizer.replaced for n in names):
            value = torch.cat([quantizer.replaced[n] for n in names])
        else:
            value = t.read()
        tensors[t.name] = value.to(dtype).contiguous()
    return tensors


def save_w4a16(model: Transformer, tokenizer: Any, out: Path, method: str, scheme: str,
               group_size: int | None = None, calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
               generation_config: dict[str, Any] | None = None, max_shard_size: int = DEFAULT_SHARD_BYTES,
               recipe: Recipe | None = None) -> Path:
    """Write the folder `out`; `calibration`: (ids [B, L], positions [B, L]) of the run's own rows,
    None for generic chat text; `group_size` None: 128, or 64 or 32 where 128 does not divide;
    `recipe`: other than the method's (`RECIPES`), for comparisons."""
    if method not in (*DEFAULT_SCHEME, BASELINE):
        raise ExportError(f"unknown 4-bit method {method!r}; choose awq or gptq")
    if scheme not in SCHEMES:
        raise ExportError(f"unknown scheme {scheme!r} for --to {method}; choose one of {', '.join(SCHEMES)}")
    group_size = check_model(model, group_size)
    dtype = storage_dtype(model)
    with torch.no_grad():
        quantizer = quantize_layers(model, tokenizer, recipe or RECIPES[method], SCHEMES[scheme], group_size, dtype,
                                    calibration, f"{method.upper()} W4A16")
        tensors = output_tensors(model, quantizer, dtype)
    items = list(tensors.items())
    shards = shard_plan(items, [v.numel() * v.element_size() for _, v in items], max_shard_size)
    files = weight_files(out, len(shards))
    for shard, file in zip(shards, files):
        save_safetensors(dict(shard), out / file, metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for _, v in items)
        write_index(out, {name: file for shard, file in zip(shards, files) for name, _ in shard}, total)
    config = export_config(model)
    cfg = config_json(config, dtype)
    cfg["quantization_config"] = quantization_config(SCHEMES[scheme], group_size, IGNORED)
    write_sidecars(out, cfg, config, generation_config, tokenizer)
    return out
