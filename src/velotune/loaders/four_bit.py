"""4-bit loading inside the streaming builder: linear weights become `Linear4bit` as they arrive.

The builder asks `FourBitStream.take(name, tensor)` about every streamed tensor before placing it.
Before the model is materialised, the stream removes the weight of every linear layer it will
handle from the meta model, so `to_empty` never allocates those 16-bit weights at all; each one
then exists only between its arrival and its quantization. Peak memory is the 4-bit model, the
16-bit parts (embeddings, norms, kept layers) and one layer in flight.

Two sources:
- a 16-bit checkpoint (HF folder, GGUF, Hub) with `load_in_4bit`: every linear layer not kept by
  the `FourBitPolicy` is quantized on the target device (PyTorch reference ops; on a GPU they run
  there). With `dynamic_keep=K` the K layers with the largest quantization error seen so far
  (activation-weighted when the policy carries calibration scales, see quant/policy.py) are
  held in 16-bit in a small heap; a layer pushed out of it is quantized then, so at most K extra
  16-bit layers are alive and the final choice is the K largest over the whole model.
- a `*-bnb-4bit` checkpoint: each weight's packed codes and quantization state (several tensors,
  listed by the checkpoint's header) are gathered and installed as they are, never dequantized.
Stacked experts of a mixture-of-experts model are quantized as they stream in too, a layer at a
time (`loaders/four_bit_experts.py`).
"""
from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping

import torch
from torch import nn

from velotune.errors import LoadError
from velotune.loaders.four_bit_experts import FourBitExperts
from velotune.models.transformer import Transformer
from velotune.quant.linear4bit import Linear4bit
from velotune.quant.nf4 import quantize_nf4
from velotune.quant.policy import FourBitPolicy, QuantReport
from velotune.quant.serialization import QuantFormatError, state_from_tensors
from velotune.quant.state import QuantState

logger = logging.getLogger(__name__)


class FourBitStream:
    """Turns the linear weights of a streamed checkpoint into `Linear4bit` layers of `model`."""

    def __init__(self, model: Transformer, *, source: str, dtype: torch.dtype, device: torch.device | str,
                 policy: FourBitPolicy | None, prequantized: Mapping[str, frozenset[str]] | None) -> None:
        """`model` is still on the meta device. `prequantized` maps each 4-bit weight of a bnb
        checkpoint to the names of all its tensors; `policy` is None only for such a checkpoint
        loaded without `load_in_4bit` (its 4-bit weights load as they are)."""
        self.model, self.source, self.dtype, self.device = model, source, dtype, torch.device(device)
        self.policy = policy or FourBitPolicy()
        self.report = QuantReport(prequantized=bool(prequantized),
                                  ranking="weight" if self.policy.input_scales is None else "activation")
        self.pieces = dict(prequantized or {})
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.kept_heap: list[tuple[float, int, str, torch.Tensor, torch.Tensor, QuantState]] = []
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        tied = "lm_head" if model.config.tie_word_embeddings else None
        if self.pieces:
            if model.config.model_type == "phi3":
                raise LoadError(f"{source}: pre-quantized Phi-3 checkpoints store q/k/v and gate/up fused in "
                                "4-bit, which cannot be split without dequantizing; load the 16-bit checkpoint "
                                "with load_in_4bit=True instead")
            targets = {}
            for weight in self.pieces:
                module = weight.removesuffix(".weight")
                if not weight.endswith(".weight") or module not in linears or module == tied:
                    raise LoadError(f"{source}: 4-bit tensor {weight!r} is not the weight of a linear layer "
                                    f"of a {model.config.model_type} model")
                targets[weight] = module
            for name in linears.keys() - set(targets.values()) - {tied}:
                self.report.kept[name] = "16-bit in the checkpoint"
        else:
            self.policy.check_patterns([n for n, _ in model.named_modules() if n], source)
            targets = {}
            for name in linears:
                if name == tied:
                    continue
                if self.policy.kept(name):
                    self.report.kept[name] = "keep_16bit"
                else:
                    targets[f"{name}.weight"] = name
            self.policy.check_dynamic(len(targets), source)
        self.experts = None
        if not self.pieces and model.config.num_experts:
            kept = {n for n, m in model.named_modules() if getattr(m, "stacked_experts", False) and self.policy.kept(n)}
            self.report.kept.update({n: "keep_16bit" for n in kept})
            self.experts = FourBitExperts(model, source=source, dtype=dtype, device=self.device,
                                          quant_type=self.policy.quant_type, kept=kept)
        self.targets = targets                     # weight name -> module name
        self.shapes = {w: tuple(linears[m].weight.shape) for w, m in targets.items()}
        for module in targets.values():
            linears[module].weight = None          # so to_empty allocates nothing for it
        self.seen: set[str] = set()
        if self.device.type == "cpu":
            logger.info("4-bit weights on the CPU: quantization and dequantization run in the PyTorch "
                        "reference implementation (correct, but slow for large models)")

    def take(self, name: str, tensor: torch.Tensor, index: tuple | None = None) -> bool:
        """Handle `name` if it is (part of) a 4-bit weight; False means the builder places it
        (always for a piece of a 16-bit parameter, `index` not None)."""
        if self.experts is not None and self.experts.take(name, tensor, index):
            return True
        if index is not None:
            return False
        if self.pieces:
            weight = self._owner(name)
            if weight is None:
                return False
            group = self.pending.setdefault(weight, {})
            group[name] = tensor
            if set(group) == self.pieces[weight]:
                self._install_prequantized(weight, self.pending.pop(weight))
            return True
        if name not in self.targets:
            return False
        if tuple(tensor.shape) != self.shapes[name]:
            raise LoadError(f"{self.source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {self.shapes[name]} from the config")
        weight = tensor.to(device=self.device, dtype=self.dtype)
        packed, state = quantize_nf4(weight, quant_type=self.policy.quant_type)
        self.seen.add(name)
        if self.policy.dynamic_keep == 0:
            self._install_4bit(self.targets[name], packed, state)
            return True
        error = self.policy.error(self.targets[name], weight, packed, state)
        self.report.errors[self.targets[name]] = error
        heapq.heappush(self.kept_heap, (error, len(self.seen), name, weight, packed, state))
        if len(self.kept_heap) > self.policy.dynamic_keep:
            _, _, smallest, _, small_packed, small_state = heapq.heappop(self.kept_heap)
            self._install_4bit(self.targets[smallest], small_packed, small_state)
        return True

    def finish(self) -> QuantReport:
        """Install the layers held in 16-bit, check nothing is missing, and return the report."""
        for _, _, name, weight, _, _ in sorted(self.kept_heap, key=lambda entry: -entry[0]):
            module = self.model.get_submodule(self.targets[name])
            module.weight = nn.Parameter(weight)
            self.report.kept[self.targets[name]] = "dynamic"
        self.kept_heap.clear()
        for weight, group in self.pending.items():  # incomplete: let the reader name what is missing
            try:
                state_from_tensors(weight, group)
            except QuantFormatError as exc:
                raise LoadError(f"{self.source}: {exc}") from None
            raise LoadError(f"{self.source}: tensor {weight!r} is missing (its quantization state is present)")
        missing = sorted(set(self.targets) - self.seen) + (self.experts.missing() if self.experts else [])
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise LoadError(f"{self.source}: missing tensors {shown}")
        if self.experts is not None:
            self.report.quantized += self.experts.installed
        logger.info("%s: %s", self.source, self.report.summary())
        return self.report

    def _owner(self, name: str) -> str | None:
        """The 4-bit weight that tensor `name` belongs to (`P` itself or `P.<piece>`)."""
        if name in self.pieces:
            return name
        head, sep, _ = name.partition(".weight.")
        weight = head + ".weight"
        return weight if sep and weight in self.pieces and name in self.pieces[weight] else None

    def _install_prequantized(self, weight: str, group: dict[str, torch.Tensor]) -> None:
        try:
            packed, state = state_from_tensors(weight, group)
        except QuantFormatError as exc:
            raise LoadError(f"{self.source}: {exc}") from None
        if tuple(state.shape) != self.shapes[weight]:
            raise LoadError(f"{self.source}: 4-bit tensor {weight!r} has shape {tuple(state.shape)} in its "
                            f"quantization state, expected {self.shapes[weight]} from the config")
        self.seen.add(weight)
        self._install_4bit(self.targets[weight], packed.to(self.device), state.to(self.device))

    def _install_4bit(self, module_name: str, packed: torch.Tensor, state: QuantState) -> None:
        parent_name, _, child = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        old = getattr(parent, child)
        new = Linear4bit(packed, state)
        if old.bias is not None:
            # the same Parameter object: the builder may still have to copy the bias into it
            new.bias = old.bias.requires_grad_(False)
        setattr(parent, child, new)
        self.report.quantized.append(module_name)
