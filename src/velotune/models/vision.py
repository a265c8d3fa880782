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
- Qwen2.5-VL's tower is the same module with other field values: dynamic resolution (`rotary`:
  the images arrive as flat patches [patches, C x T x P x P] with their grids, a 2-D rotary
  embedding replaces the learned positions), RMSNorm (`norm`), a fused q/k/v projection
  (`fused_qkv`), a gated SiLU MLP (`gated_mlp`), a temporal patch of two frames (a still image is
  its frame twice), and attention inside windows of `window_size` pixels except in
  `full_attention_layers` (geometry in models/vision_grid.py). Its patch merger is the `mlp`
  projector with a norm in front (`projector_norm`) and `spatial_merge_size`^2 neighbouring
  patches concatenated into one decoder token. transformers names these modules differently
  (`visual.blocks.0.attn.qkv`, `visual.merger.mlp.0`); vision_families.py renames them.
- The tower is frozen by default in training (`lora/config.py` keeps adapters off it unless
  `lora_vision` is set) and runs in the model's dtype; attention is SDPA without a mask (every
  patch sees every patch) for fixed-size images, variable-length two-way attention over each
  image or window (`kernels.varlen_attention`, PyTorch's flash kernel on a GPU) for patch grids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from velotune import kernels
from velotune.errors import ConfigError
from velotune.models.norms import RMSNorm
from velotune.models.vision_grid import image_segments, patch_positions, window_order

VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")
NORMS = ("layer", "rms")
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
    # Dynamic-resolution towers (Qwen2.5-VL; see the module docstring)
    rotary: bool = False                   # 2-D rotary positions over patch grids, no learned table
    rope_theta: float = 10000.0
    temporal_patch_size: int = 1
    norm: str = "layer"
    fused_qkv: bool = False
    gated_mlp: bool = False
    spatial_merge_size: int = 1
    window_size: int = 0                   # pixels; 0: every layer attends over the whole image
    full_attention_layers: tuple[int, ...] = ()
    projector_norm: bool = False           # an RMSNorm over each patch before the merge
    projector_hidden_size: int = 0         # the MLP's inner width (0: the decoder's width)

    def __post_init__(self) -> None:
        self.full_attention_layers = tuple(self.full_attention_layers)
        if self.norm not in NORMS:
            raise ConfigError(f"vision_config: norm {self.norm!r} is not one of {NORMS}")
        if self.rotary and self.window_size % (self.spatial_merge_size * self.patch_size):
            raise ConfigError(f"vision_config: window_size {self.window_size} is not a multiple of "
                              f"spatial_merge_size x patch_size ({self.spatial_merge_size * self.patch_size})")
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
        """Rows of the learned position table (none with rotary positions)."""
        return 0 if self.rotary else self.patches_per_side ** 2 + int(self.class_token)

    @property
    def patch_dim(self) -> int:
        """Pixels in one patch (one flat row of a patch-grid image's pixel_values)."""
        return self.num_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merged_dim(self) -> int:
        """Width of the projector's input: the tower's, times the patches merged into a token."""
        return self.hidden_size * self.spatial_merge_size ** 2

    def num_parameters(self) -> int:
        """Parameters of the tower and the projector, from the config alone (the memory estimator's
        weights; a frozen tower keeps no activations for the backward)."""
        h, i, layers, th = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.text_hidden_size
        embeddings = self.patch_dim * h + h * self.patch_bias + self.num_positions * h
        embeddings += h * self.class_token
        norm = h if self.norm == "rms" else 2 * h
        mlp = 3 * h * i + 2 * i + h if self.gated_mlp else 2 * h * i + i + h
        layer = 4 * (h * h + h) + mlp + 2 * norm
        norms = 2 * h * (int(self.pre_norm) + int(self.post_norm))
        if self.projector == "mlp":
            m, inner = self.merged_dim, self.projector_hidden_size or th
            projector = m * inner + inner * th + (inner + th) * self.projector_bias + h * self.projector_norm
        else:
            projector = h + h * th
        return embeddings + layers * layer + norms + projector

    @property
    def image_tokens(self) -> int:
        """Decoder tokens one image becomes (0: it depends on the image's size, `rotary` towers)."""
        if self.rotary:
            return 0
        if self.projector == "pool_norm_linear":
            return self.tokens_per_image
        return self.num_positions - int(self.drop_class_token)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_pytorch_tanh" else "none")


class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        if c.temporal_patch_size > 1:   # a patch spans frames; applied as a matrix on flat patches
            kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
            self.patch_embedding: nn.Module = nn.Conv3d(c.num_channels, c.hidden_size, kernel, kernel, bias=c.patch_bias)
        else:
            self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size,
                                             bias=c.patch_bias)
        if c.class_token:
            self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        if not c.rotary:
            self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        if pixels.dim() == 2:   # flat patches [patches, C x T x P x P]: the convolution is a matrix
            return F.linear(pixels.to(weight.dtype), weight.flatten(1), self.patch_embedding.bias)
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
        if c.fused_qkv:
            self.qkv = nn.Linear(h, 3 * h)
        else:
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                segments: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """x [N, T, H] (fixed-size images), or flat patches [patches, H] with their `rope` (cos, sin
        [patches, head_dim]) and `segments` (int32 offsets, longest): attention within each."""
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        else:
            q, k, v = (p(x).unflatten(-1, (self.heads, -1)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if segments is None:    # [N, T, heads, D]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.out_proj(out.transpose(1, 2).flatten(2))
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        offsets, longest = segments
        out = kernels.varlen_attention(q, k, v, offsets, longest, q.shape[-1] ** -0.5, causal=False)
        return self.out_proj(out.flatten(1))


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding of x [patches, heads, D] in float32, as Qwen2.5-VL's tower computes it."""
    cos, sin = (r.unsqueeze(-2).float() for r in rope)
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        h, i = c.hidden_size, c.intermediate_size
        if c.gated_mlp:
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)
        else:
            self.fc1, self.fc2 = nn.Linear(h, i), nn.Linear(i, h)
        self.act = c.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(activation(self.act, self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(activation(self.act, self.fc1(x)))


def vision_norm(c: VisionConfig) -> nn.Module:
    return RMSNorm(c.hidden_size, c.layer_norm_eps) if c.norm == "rms" else nn.LayerNorm(c.hidden_size,
                                                                                                 eps=c.layer_norm_eps)


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = vision_norm(c)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = vision_norm(c)
        self.mlp = VisionMLP(c)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                segments: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), rope, segments)
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

    def forward(self, pixels: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """The features of `config.feature_layer` [N, positions, H] (the post-norm only on the
        last layer's output, where SigLIP applies it); for a `rotary` tower, flat patches
        [patches, C x T x P x P] of images with patch grids `grid` [images, 3] give [patches, H]."""
        c = self.config
        if c.rotary:
            if grid is None:
                raise ValueError("this vision tower takes flat patches with their image_grid_thw")
            return self.forward_grid(pixels, grid)
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

    def forward_grid(self, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Patch-grid images through every layer, in windows where the config says so; the
        output in the patches' own order (models/vision_grid.py)."""
        c = self.config
        x = self.embeddings(pixels)
        n, unit, merge = x.shape[0], c.spatial_merge_size ** 2, c.spatial_merge_size
        grid = grid.cpu()
        if int(grid.prod(-1).sum()) != n:
            raise ValueError(f"image_grid_thw holds {int(grid.prod(-1).sum())} patches, pixel_values {n}")
        window = c.window_size // merge // c.patch_size
        order, window_offsets = window_order(grid, merge, window) if window else (torch.arange(n // unit), None)
        order = order.to(x.device)

        def windowed(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n // unit, unit, -1)[order].reshape(n, -1)

        x = windowed(x)
        positions = patch_positions(grid, merge).to(x.device)
        dim = c.hidden_size // c.num_attention_heads // 2
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
        angles = (positions[..., None].float() * inv_freq).flatten(1)      # [patches, head_dim / 2]
        angles = windowed(torch.cat((angles, angles), dim=-1))
        rope = (angles.cos(), angles.sin())
        images = image_segments(grid)
        full = (images.to(x.device), int(images.diff().max()))
        windows = full if window_offsets is None else (window_offsets.to(x.device), int(window_offsets.diff().max()))
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, rope, full if i in c.full_attention_layers else windows)
        return x.reshape(n // unit, unit, -1)[torch.argsort(order)].reshape(n, -1)


class Projector(nn.Module):
    """Image features [N, positions, vision H] -> decoder embeddings [N, image_tokens, text H]."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.config = c
        if c.projector == "mlp":
            inner = c.projector_hidden_size or c.text_hidden_size
            if c.projector_norm:
                self.norm = RMSNorm(c.hidden_size, c.projector_norm_eps)
            self.linear_1 = nn.Linear(c.merged_dim, inner, bias=c.projector_bias)
            self.linear_2 = nn.Linear(inner, c.text_hidden_size, bias=c.projector_bias)
        else:
            self.mm_soft_emb_norm = OffsetRMSNorm(c.hidden_size, c.projector_norm_eps)
            self.mm_input_projection = nn.Linear(c.hidden_size, c.text_hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N, positions, vision H] -> [N, image_tokens, text H]; a patch-grid tower's [patches, H]
        -> [patches / merge^2, text H] (each merge block's patches side by side)."""
        c = self.config
        if c.projector == "mlp":
            if c.projector_norm:
                features = self.norm(features)
            if c.spatial_merge_size > 1:
                features = features.reshape(-1, c.merged_dim)
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
