"""LoRA and DoRA layers around a frozen base: `LoraLinear` (nn.Linear or 4-bit `Linear4bit`) and
`LoraEmbedding` (nn.Embedding), with PEFT's parameter names and formulas.

Math (s = alpha/r, or alpha/sqrt(r) with rsLoRA):
- LoRA: y = base(x) + s * B(A(dropout(x))). The low-rank path is evaluated as (x A^T) B^T; the
  product B A is never formed in the forward.
- DoRA (as PEFT computes it): with W' = W + s B A and n = per-output-feature L2 norm of W', the
  layer computes m / n * W' x (+ bias). n is detached (DoRA paper, section 4.3): m gets gradient,
  the norm does not. For a linear layer n is the norm of each row of W' [out, in]; for an embedding
  PEFT normalises each embedding dimension over the vocabulary. n is computed from the factors,
  ||W_i||^2 + 2s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T, so no [out, in] temporary is needed
  beyond the (dequantized) base weight.
- Embeddings take no dropout (PEFT ignores it there too).

Parameter names are PEFT's minus the adapter name: `lora_A.weight`, `lora_B.weight`,
`lora_magnitude_vector` for linears and `lora_embedding_A`/`lora_embedding_B` for embeddings,
so a layer's state_dict keys equal PEFT's saved keys after the `base_model.model.` prefix.

`weight` on a LoRA layer is the weight the layer effectively applies (base + adapter, no dropout):
code that reads `lm_head.weight` directly (the fused linear cross-entropy) then sees the adapted
head, with gradients reaching A, B and m (without LoRA dropout on that path). Assigning a
Parameter to `weight` (as `tie_weights` does) sets the base layer's weight.

Merging writes base + adapter into the base weight. It is undone arithmetically (DoRA keeps the
norm of the unmerged weight for that), except for two bases whose original is kept instead and put
back on unmerge: a 4-bit base (the merged weight cannot be stored in 4 bits; the merged layer is an
nn.Linear in the base's dtype) and a weight shared with another module (a tied head: merging gets a
private copy, so the embedding never changes). The kept original sits outside the module tree, so
`state_dict()` and `.to()` do not see it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from velotune.lora.config import LoraConfig


class LoraStateError(RuntimeError):
    """Merging an already merged layer, unmerging an unmerged one, and the like."""


def frozen_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's weight as a tensor ([out, in] for linears, [vocab, dim] for embeddings),
    dequantized when the base is 4-bit."""
    if hasattr(base, "dequantized_weight"):
        return base.dequantized_weight(dtype)
    weight = base.weight
    return weight if dtype is None else weight.to(dtype)


def base_dtype_and_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype, weight.device
    tensor = next(iter(base.buffers()), None)
    if tensor is None or not hasattr(base, "weight_dtype"):
        raise TypeError(f"cannot adapt a {type(base).__name__}: it has no floating weight")
    return base.weight_dtype, tensor.device


@torch.no_grad()
def dora_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of weight + scale * b @ a (weight [out, in], a [r, in], b [out, r]) in float32,
    from the factors. The clamp only guards rounding when a row cancels to ~0."""
    a, b = a.to(weight.dtype), b.to(weight.dtype)
    w_sq = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    cross = (b.float() * (weight @ a.t()).float()).sum(dim=1)
    a, b = a.float(), b.float()
    delta_sq = ((b @ (a @ a.t())) * b).sum(dim=1)
    return (w_sq + 2 * scale * cross + scale * scale * delta_sq).clamp(min=0).sqrt()


class LoraLayer(nn.Module):
    """State and merge logic shared by the linear and the embedding variant. Subclasses define `a`
    ([r, in]) and `b` ([out, r]) and `base_layout`, which maps an [out, in] matrix to the base
    weight's layout and back (identity for linears, transpose for embeddings)."""

    base_layer: nn.Module
    lora_magnitude_vector: nn.Parameter | None

    def __init__(self, base: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        self.base_layer = base
        self.r = config.r
        self.scale = config.scale
        self.use_dora = config.use_dora
        self.adapters_enabled = True
        self.merged = False
        self._merge_norm: torch.Tensor | None = None
        self._restore: tuple[nn.Module | nn.Parameter, ...] = ()

    # Subclass interface.
    @property
    def a(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def b(self) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def base_layout(matrix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Shared.
    @property
    def active(self) -> bool:
        """Whether the forward adds the adapter (it is enabled and not merged into the base)."""
        return self.adapters_enabled and not self.merged

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def init_magnitude(self) -> None:
        """DoRA's magnitude starts as the norm of the current adapted weight."""
        dtype = self.a.dtype
        weight = frozen_weight(self.base_layer, dtype)
        self.lora_magnitude_vector = nn.Parameter(self.norm(weight).to(dtype))

    def norm(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's detached norm of base + adapter, one per output feature (float32)."""
        return dora_norm(self.base_layout(weight), self.a, self.b, self.scale)

    def dora_factor(self, weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
        """m / n shaped to broadcast against the base weight."""
        assert self.lora_magnitude_vector is not None
        norm = self.norm(weight) if norm is None else norm
        factor = self.lora_magnitude_vector / norm.to(self.lora_magnitude_vector.dtype)
        return self.base_layout(factor[:, None]).to(weight.dtype)

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        """s * B A in the base weight's layout."""
        return self.base_layout(self.b.to(dtype) @ self.a.to(dtype)) * self.scale

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (the base weight, in its layout) with this adapter applied."""
        adapted = weight + self.delta(weight.dtype)
        if self.lora_magnitude_vector is None:
            return adapted
        return self.dora_factor(weight) * adapted

    @property
    def weight(self) -> torch.Tensor:
        base = frozen_weight(self.base_layer)
        return self.adapted_weight(base) if self.active else base

    def __setattr__(self, name: str, value: object) -> None:
        # nn.Module would register a Parameter assigned to `weight` on this layer (tie_weights
        # does that); it belongs to the base.
        if name == "weight":
            if not isinstance(value, nn.Parameter):
                raise TypeError(f"the base weight of a LoRA layer must be an nn.Parameter, got {type(value).__name__}")
            self.base_layer.weight = value
        else:
            super().__setattr__(name, value)

    @torch.no_grad()
    def merge(self, *, shared_weight: bool = False) -> None:
        """Write the adapter into the base weight. `shared_weight`: the base weight is also used by
        another module (tied head), so it is replaced by a merged private copy, not changed."""
        if self.merged:
            raise LoraStateError("merge: this LoRA layer is already merged")
        base = self.base_layer
        weight = frozen_weight(base)
        merged = self.adapted_weight(weight)
        if hasattr(base, "dequantized_weight"):
            self._restore = (base,)
            linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                               device=merged.device, dtype=merged.dtype)
            linear.weight = nn.Parameter(merged, requires_grad=False)
            if base.bias is not None:
                linear.bias = nn.Parameter(base.bias.detach().to(merged.dtype), requires_grad=False)
            self.base_layer = linear
        elif shared_weight:
            self._restore = (base.weight,)
            base.weight = nn.Parameter(merged, requires_grad=False)
        else:
            if self.lora_magnitude_vector is not None:
                self._merge_norm = self.norm(weight)
            base.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise LoraStateError("unmerge: this LoRA layer is not merged")
        if self._restore:
            original = self._restore[0]
            if isinstance(original, nn.Parameter):
                self.base_layer.weight = original
            else:
                self.base_layer = original
            self._restore = ()
        else:
            weight = self.base_layer.weight
            if self.lora_magnitude_vector is not None:
                weight.div_(self.dora_factor(weight, self._merge_norm))
                self._merge_norm = None
            weight.sub_(self.delta(weight.dtype))
        self.merged = False

    def merged_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Base + adapter in `dtype`, computed without touching the layer (for exports)."""
        with torch.no_grad():
            weight = frozen_weight(self.base_layer, dtype)
            return self.adapted_weight(weight) if self.active else weight


class LoraLinear(LoraLayer):
    """y = base(x) + s * B(A(dropout(x))), or its DoRA form; the base stays frozen."""

    def __init__(self, base: nn.Module, config: LoraConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__(base, config)
        self.in_features, self.out_features = base.in_features, base.out_features
        base_dtype, device = base_dtype_and_device(base)
        # Created in float32 and initialised in the order PEFT uses (two nn.Linear default inits,
        # then A again), so the same seed gives PEFT's initial adapter on the CPU.
        self.lora_A = nn.Linear(self.in_features, config.r, bias=False, device=device)
        self.lora_B = nn.Linear(config.r, self.out_features, bias=False, device=device)
        if config.init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif config.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / config.r)
        if config.init is not False:
            nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(dtype or base_dtype)
        self.lora_B.to(dtype or base_dtype)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.register_parameter("lora_magnitude_vector", None)
        if config.use_dora:
            self.init_magnitude()

    @property
    def a(self) -> torch.Tensor:
        return self.lora_A.weight

    @property
    def b(self) -> torch.Tensor:
        return self.lora_B.weight

    @staticmethod
    def base_layout(matrix: torch.Tensor) -> torch.Tensor:
        return matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active:
            return result
        dropped = self.lora_dropout(x.to(self.a.dtype))
        lora = self.lora_B(self.lora_A(dropped)) * self.scale
        if self.lora_magnitude_vector is None:
            return result + lora.to(result.dtype)
        # DoRA: m/n * (W x + s B A x) + bias, written as a correction of the base output. With
        # dropout active, the base term uses the dropped input too, as in PEFT.
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_part = result
        else:
            base_part = self.base_layer(dropped.to(x.dtype))
        if bias is not None:
            base_part = base_part - bias.to(base_part.dtype)
        factor = self.dora_factor(frozen_weight(self.base_layer, self.a.dtype)).view(-1)
        return result + ((factor - 1) * base_part.to(factor.dtype) + factor * lora).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, dora={self.use_dora}, merged={self.merged}"


class LoraEmbedding(LoraLayer):
    """e = base(ids) + s * (A^T[ids]) B^T, or its DoRA form (PEFT's `lora_embedding_A/B`)."""

    def __init__(self, base: nn.Embedding, config: LoraConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__(base, config)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        base_dtype, device = base_dtype_and_device(base)
        a = torch.randn((config.r, self.num_embeddings), device=device)
        b = torch.randn((self.embedding_dim, config.r), device=device)
        if config.init is not False:  # PEFT: A zeros, B standard normal, for every init mode
            a.zero_()
            nn.init.normal_(b)
        self.lora_embedding_A = nn.Parameter(a.to(dtype or base_dtype))
        self.lora_embedding_B = nn.Parameter(b.to(dtype or base_dtype))
        self.register_parameter("lora_magnitude_vector", None)
        if config.use_dora:
            self.init_magnitude()

    @property
    def a(self) -> torch.Tensor:
        return self.lora_embedding_A

    @property
    def b(self) -> torch.Tensor:
        return self.lora_embedding_B

    @staticmethod
    def base_layout(matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)
        if not self.active:
            return result
        base = self.base_layer
        rows = F.embedding(ids, self.a.t(), base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)
        lora = (rows @ self.b.t()) * self.scale
        if self.lora_magnitude_vector is None:
            return result + lora.to(result.dtype)
        factor = self.dora_factor(frozen_weight(base, self.a.dtype)).view(-1)
        return (factor * (result.to(factor.dtype) + lora)).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, dora={self.use_dora}, merged={self.merged}"
