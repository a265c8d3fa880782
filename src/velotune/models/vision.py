"""The vision side of a vision-language model: one config-driven ViT encoder and one projector.

Design choices:
- One `VisionConfig` holds every tower's quirks as fields (a class token and a norm before the
  encoder for CLIP; a biased patch convolution and a norm after it for SigLIP; which layer's
  output is read, whether the class token is dropped), so CLIP and SigLIP towers are the same
  module, as the decoder is one module for every text family. `vision_families.py` says which
  field values a checkpoint's config.json implies.
- Parameter names equal transformers 5's under `vision_tower.` (`encoder.layers.0.self_attn.
  q_proj.weight`, ...), so checkpoints load without renaming inside the tower.
- The projector's kind is a field too: LLaVA's two-layer MLP (`mlp`), or Gemma 3's average pool
  to a fixed number of tokens, (1 + w) RMSNorm and a bias-free matrix (`pool_norm_linear`).
- The tower is frozen by default in training (`lora/config.py` keeps adapters off it unless
  `lora_vision` is set) and runs in the model's dtype; attention is SDPA without a mask (every
  patch sees every patch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from velotune.errors import ConfigError

VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
PROJECTORS = ("mlp", "pool_norm_linear")


@dataclass
class VisionConfig:
    """Shape and quirks of a ViT image encoder and of the projector into the decoder's width."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    text_hidden_size: int                  # the decoder's width, the projector's output
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    class_token: bool = False              # CLIP: a learned class embedding before the patches
    patch_bias: bool = False               # SigLIP: the patch convolution has a bias
    pre_norm: bool = False                 # CLIP: `pre_layrnorm` over the embeddings
    # Both towers hold a `post_layernorm`; SigLIP applies it to the last layer's output, CLIP only
    # to its pooled class token, which no vision-language model reads.
    post_norm: bool = False
    post_norm_on_features: bool = False
    feature_layer: int = -1                # which hidden state feeds the projector (LLaVA: -2)
    drop_class_token: bool = False         # LLaVA's "default" select strategy: the first position is dropped
    projector: str = "mlp"
    projector_act: str = "gelu"
    projector_bias: bool = True
    tokens_per_image: int = 0              # pool_norm_linear: tokens after pooling (Gemma 3: 256)
    projector_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError(f"vision_config: unsupported hidden_act {self.hidden_act!r} "
                              f"({', '.join(VISION_ACTIVATIONS)})")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"vision projector {self.projector!r} is not one of {PROJECTORS}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if not -self.num_hidden_layers - 1 <= self.feature_layer <= self.num_hidden_layers:
            raise ConfigError(f"vision_feature_layer {self.feature_layer} is outside the tower's "
                              f"{self.num_hidden_layers} layers")
        if self.projector == "pool_norm_linear":
            side = self.patches_per_side
            pooled = math.isqrt(self.tokens_per_image)
            if pooled * pooled != self.tokens_per_image or pooled == 0 or side % pooled:
                raise ConfigError(f"mm_tokens_per_image {self.tokens_per_image} is not a square whose side "
                                  f"divides the {side} patches per side")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.patches_per_side ** 2 + int(self.class_token)

    def num_parameters(self) -> int:
        """Parameters of the tower and the projector, from the config alone (the memory estimator's
        weights; a frozen tower keeps no activations for the backward)."""
        h, i, layers, th = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.text_hidden_size
        embeddings = self.num_channels * self.patch_size ** 2 * h + h * self.patch_bias + self.num_positions * h
        embeddings += h * self.class_token
        layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h
        norms = 2 * h * (int(self.pre_norm) + int(self.post_norm))
        if self.projector == "mlp":
            projector = h * th + th * th + 2 * th * self.projector_bias
        else:
            projector = h + h * th
        return embeddings + layers * layer + norms + projector

    @property
    def image_tokens(self) -> int:
        """Decoder tokens one image becomes."""
        if self.projector == "pool_norm_linear":
            return self.tokens_per_image
        return self.num_positions - int(self.drop_class_token)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if name == "gelu_pytorch_tanh" else "none")


class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=c.patch_bias)
        if c.class_token:
            self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)   # [N, patches, H]
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"images give {x.shape[1]} positions, the tower has "
                             f"{self.position_embedding.num_embeddings} (wrong image size?)")
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        h = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, h))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = c.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_hidden_layers))


class VisionTower(nn.Module):
    """Embeddings, optional pre-norm, encoder, optional post-norm (Hugging Face's CLIP and SigLIP
    vision models, whose `vision_model.` level transformers 5 drops, as we do)."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.embeddings = VisionEmbeddings(c)
        if c.pre_norm:
            self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)   # (sic: CLIP's spelling)
        self.encoder = VisionEncoder(c)
        if c.post_norm:
            self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The features of `config.feature_layer` [N, positions, H] (the post-norm only on the
        last layer's output, where SigLIP applies it)."""
        c = self.config
        x = self.embeddings(pixels)
        if c.pre_norm:
            x = self.pre_layrnorm(x)
        layers = len(self.encoder.layers)
        stop = c.feature_layer % (layers + 1)     # hidden state index: 0 = embeddings, layers = last
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        if c.post_norm_on_features and stop == layers:
            x = self.post_layernorm(x)
        if c.drop_class_token:
            x = x[:, 1:]
        return x


class Projector(nn.Module):
    """Image features [N, positions, vision H] -> decoder embeddings [N, image_tokens, text H]."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.config = c
        if c.projector == "mlp":
            self.linear_1 = nn.Linear(c.hidden_size, c.text_hidden_size, bias=c.projector_bias)
            self.linear_2 = nn.Linear(c.text_hidden_size, c.text_hidden_size, bias=c.projector_bias)
        else:
            self.mm_soft_emb_norm = OffsetRMSNorm(c.hidden_size, c.projector_norm_eps)
            self.mm_input_projection = nn.Linear(c.hidden_size, c.text_hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.projector == "mlp":
            return self.linear_2(activation(c.projector_act, self.linear_1(features)))
        n, _, h = features.shape
        side, pooled = c.patches_per_side, math.isqrt(c.tokens_per_image)
        grid = features.transpose(1, 2).reshape(n, h, side, side)
        pooled_features = F.avg_pool2d(grid, side // pooled).flatten(2).transpose(1, 2)
        normed = self.mm_soft_emb_norm(pooled_features)
        return self.mm_input_projection(normed.to(self.mm_input_projection.weight.dtype))


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm, scaling by (1 + w) in float32, as Gemma 3's projector computes it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return out.to(x.dtype)
