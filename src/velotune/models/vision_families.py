"""Every supported vision-language family as one row of data: how its config.json nests the
decoder and the vision tower, which `VisionConfig` fields it implies, and how its checkpoints
name tensors.

A vision-language checkpoint is a decoder of a family `families.py` already knows (LLaVA: Llama,
Mistral, Qwen 2 ...; Gemma 3: gemma3_text) plus a vision tower and a projector. So the row reads the
decoder from `text_config` through the ordinary `ModelConfig` reader and adds the vision fields;
the model is the same `Transformer` with a `vision_tower` and a `multi_modal_projector`.

Checkpoint names come in several spellings: transformers 5.25 saves a LLaVA as
`model.language_model.*`, `vision_tower.*`, `multi_modal_projector.*` and `lm_head.*` (and holds
`model.vision_tower.*` and `model.multi_modal_projector.*` in memory), but a Gemma 3 with the
decoder as `language_model.model.*`; checkpoints saved by transformers 4 (most of the Hub) write
`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*` and
`multi_modal_projector.*`. All are read (`to_ours`); exports write what transformers 5.25 saves
for the family (`to_hf`, the row's `write_prefixes`), which it reads back as the same class.

Qwen2.5-VL is saved in the Hub's layout (`model.layers.*`, `lm_head.*`, and the tower and its
patch merger under `visual.*`, `model.visual.*` in memory) with its own module names inside the
tower (`blocks.0.attn.qkv`, `merger.mlp.0`); `QWEN_VISUAL` renames them both ways. Its decoder is
a Qwen 2 whose rotary positions are M-RoPE (`mrope_section`, models/vision_grid.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from velotune.errors import ConfigError
from velotune.models.vision import VisionConfig

# Checkpoint name prefix -> ours, longest first; ours are the text decoder's own names plus
# `vision_tower.` and `multi_modal_projector.` at the top level.
READ_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
# Qwen2.5-VL's tower (`visual.` in its checkpoints) -> ours: the patch merger is our projector.
VISUAL = "visual."
QWEN_VISUAL = (
    ("merger.ln_q.", "multi_modal_projector.norm."),
    ("merger.mlp.0.", "multi_modal_projector.linear_1."),
    ("merger.mlp.2.", "multi_modal_projector.linear_2."),
    ("patch_embed.proj.", "vision_tower.embeddings.patch_embedding."),
    ("blocks.", "vision_tower.encoder.layers."),
)
QWEN_BLOCK = ((".attn.qkv.", ".self_attn.qkv."), (".attn.proj.", ".self_attn.out_proj."),
              (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."))
# Parameters Hugging Face keeps as bare matrices that we hold as nn.Linear weights (transposed).
TRANSPOSED = {"multi_modal_projector.mm_input_projection_weight": "multi_modal_projector.mm_input_projection.weight"}


def to_ours(name: str) -> tuple[str, bool]:
    """(our parameter name, whether the tensor is stored transposed) of a checkpoint tensor name."""
    if name.startswith(("model." + VISUAL, VISUAL)):
        return _renamed(name.split(VISUAL, 1)[1], QWEN_VISUAL, QWEN_BLOCK), False
    for prefix, ours in READ_PREFIXES:
        if name.startswith(prefix):
            name = ours + name[len(prefix):]
            break
    if name in TRANSPOSED:
        return TRANSPOSED[name], True
    return name, False


def _renamed(name: str, prefixes: tuple[tuple[str, str], ...], inner: tuple[tuple[str, str], ...]) -> str:
    """`name` (a parameter or a module path) with its first matching prefix and every matching
    inner piece replaced (pairs are (from, to), each ending in a dot)."""
    name += "."
    for old, new in prefixes:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    for old, new in inner:
        name = name.replace(old, new)
    return name[:-1]


def _visual_name(name: str) -> str:
    """Our tower or projector path under Qwen2.5-VL's `visual.` names (`to_ours` read backwards)."""
    return _renamed(name, tuple((b, a) for a, b in QWEN_VISUAL), tuple((b, a) for a, b in QWEN_BLOCK))


def to_hf(name: str, family: VisionFamily) -> tuple[str, bool]:
    """(transformers 5.25's checkpoint name for the family, whether to write the tensor
    transposed) of ours."""
    if family.visual_prefix and name.startswith(("vision_tower.", "multi_modal_projector.")):
        return family.visual_prefix + _visual_name(name), False
    transposed = {ours: hf for hf, ours in TRANSPOSED.items()}
    if name in transposed:
        name, flip = transposed[name], True
    else:
        flip = False
    for prefix, hf in family.write_prefixes:
        if name.startswith(prefix):
            return hf + name[len(prefix):], flip
    return name, flip


# Ours -> transformers 5's module paths in memory (what PEFT's adapter keys and target_modules name).
IN_MEMORY_PREFIXES = (("model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                      ("multi_modal_projector.", "model.multi_modal_projector."))


def transformers_name(name: str, family: VisionFamily | None = None) -> str:
    """Our parameter or module path as transformers 5 names it in a vision-language model's memory;
    `to_ours` reads it back."""
    if family is not None and family.visual_prefix and name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + VISUAL + _visual_name(name)
    for prefix, hf in IN_MEMORY_PREFIXES:
        if name.startswith(prefix):
            return hf + name[len(prefix):]
    return name


def _tower(vision: dict[str, Any], path: str) -> dict[str, Any]:
    """The tower's fields from `vision_config` (CLIP or SigLIP)."""
    kind = vision.get("model_type")
    if kind not in ("clip_vision_model", "siglip_vision_model"):
        raise ConfigError(f"{path}: vision_config.model_type {kind!r} is not supported "
                          "(clip_vision_model, siglip_vision_model)")

    def need(key: str) -> Any:
        if key not in vision:
            raise ConfigError(f"{path}: vision_config lacks {key!r}")
        return vision[key]

    clip = kind == "clip_vision_model"
    if not clip and vision.get("vision_use_head", True):
        raise ConfigError(f"{path}: vision_config.vision_use_head is true: a SigLIP pooling head feeds no "
                          "vision-language model we support")
    return dict(hidden_size=int(need("hidden_size")), intermediate_size=int(need("intermediate_size")),
                num_hidden_layers=int(need("num_hidden_layers")), num_attention_heads=int(need("num_attention_heads")),
                image_size=int(need("image_size")), patch_size=int(need("patch_size")),
                num_channels=int(vision.get("num_channels", 3)),
                layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5 if clip else 1e-6)),
                hidden_act=vision.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh"),
                class_token=clip, pre_norm=clip, patch_bias=not clip, post_norm=True, post_norm_on_features=not clip)


def _gemma3(cfg: dict[str, Any], text_hidden: int, path: str) -> dict[str, Any]:
    return dict(feature_layer=-1, projector="pool_norm_linear", tokens_per_image=int(cfg.get("mm_tokens_per_image", 256)),
                projector_norm_eps=float(cfg["vision_config"].get("layer_norm_eps", 1e-6)))


def _llava(cfg: dict[str, Any], text_hidden: int, path: str) -> dict[str, Any]:
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConfigError(f"{path}: vision_feature_layer {layer!r}: only one layer is supported")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"{path}: vision_feature_select_strategy {strategy!r} is not default or full")
    return dict(feature_layer=layer, drop_class_token=strategy == "default", projector="mlp",
                projector_act=cfg.get("projector_hidden_act", "gelu"),
                projector_bias=bool(cfg.get("multimodal_projector_bias", True)))


def _qwen2_5_vl_tower(vision: dict[str, Any], path: str) -> dict[str, Any]:
    """Qwen2.5-VL's vision_config: a dynamic-resolution tower whose merger is the projector."""
    def need(key: str) -> Any:
        if key not in vision:
            raise ConfigError(f"{path}: vision_config lacks {key!r}")
        return vision[key]

    hidden, merge = int(need("hidden_size")), int(vision.get("spatial_merge_size", 2))
    depth = int(need("depth"))
    full = [int(i) for i in vision.get("fullatt_block_indexes", [])]
    if any(not 0 <= i < depth for i in full):
        raise ConfigError(f"{path}: vision_config.fullatt_block_indexes {full} names blocks outside 0..{depth - 1}")
    rope = vision.get("rope_parameters") or {}
    return dict(hidden_size=hidden, intermediate_size=int(need("intermediate_size")), num_hidden_layers=depth,
                num_attention_heads=int(need("num_heads")), image_size=0, patch_size=int(vision.get("patch_size", 14)),
                num_channels=int(vision.get("in_channels", vision.get("in_chans", 3))), layer_norm_eps=1e-6,
                hidden_act=vision.get("hidden_act", "silu"), rotary=True, rope_theta=float(rope.get("rope_theta", 10000.0)),
                temporal_patch_size=int(vision.get("temporal_patch_size", 2)), norm="rms", fused_qkv=True,
                gated_mlp=True, spatial_merge_size=merge, window_size=int(vision.get("window_size", 112)),
                full_attention_layers=tuple(full), projector="mlp", projector_act="gelu", projector_bias=True,
                projector_norm=True, projector_norm_eps=1e-6, projector_hidden_size=hidden * merge * merge)


def _qwen2_5_vl(cfg: dict[str, Any], text_hidden: int, path: str) -> dict[str, Any]:
    out = int(cfg["vision_config"].get("out_hidden_size", text_hidden))
    if out != text_hidden:
        raise ConfigError(f"{path}: vision_config.out_hidden_size {out} is not the decoder's hidden_size {text_hidden}")
    return {}


@dataclass(frozen=True)
class VisionFamily:
    model_type: str                   # Hugging Face `model_type` of the whole model
    architecture: str                 # its `architectures[0]`
    text_model_type: str              # text_config's model_type when it does not say
    projector: Callable[[dict[str, Any], int, str], dict[str, Any]]
    default_image_token_id: int
    # The prompt text of one image: what the chat template writes ("" = the image token itself)
    # and what it becomes around the image's tokens (the processor's expansion).
    placeholder: str = ""
    expansion: str = "{tokens}"
    # Gemma 3: image tokens attend to every token of their own image, not only earlier ones
    # (transformers does so whenever its processor's token_type_ids are passed, as in training).
    bidirectional_images: bool = False
    write_prefixes: tuple[tuple[str, str], ...] = (("model.", "model.language_model."),)
    # The tower's own reader (default: CLIP or SigLIP `_tower`).
    tower: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    # Checkpoints keep tower and projector under this prefix with Qwen2.5-VL's names (QWEN_VISUAL).
    visual_prefix: str = ""
    # text_config model types read as one of ours (Qwen2.5-VL's decoder is a Qwen 2).
    text_aliases: tuple[tuple[str, str], ...] = ()
    # Decoder rotary positions: M-RoPE, three position ids per token (models/vision_grid.py).
    mrope: bool = False

    def vision_config(self, cfg: dict[str, Any], text_hidden: int, path: str) -> VisionConfig:
        vision = cfg.get("vision_config")
        if not isinstance(vision, dict):
            raise ConfigError(f"{path}: a {self.model_type} config needs a vision_config")
        fields = (self.tower or _tower)(vision, path)
        fields.update(self.projector(cfg, text_hidden, path))
        return VisionConfig(text_hidden_size=text_hidden, **fields)


VISION_FAMILIES: dict[str, VisionFamily] = {f.model_type: f for f in (
    VisionFamily("llava", "LlavaForConditionalGeneration", "llama", _llava, 32000),
    VisionFamily("gemma3", "Gemma3ForConditionalGeneration", "gemma3_text", _gemma3, 262_144,
                 placeholder="<start_of_image>", expansion="\n\n<start_of_image>{tokens}<end_of_image>\n\n",
                 bidirectional_images=True,
                 write_prefixes=(("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))),
    VisionFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2", _qwen2_5_vl, 151_655,
                 placeholder="<|vision_start|><|image_pad|><|vision_end|>",
                 expansion="<|vision_start|>{tokens}<|vision_end|>", write_prefixes=(), tower=_qwen2_5_vl_tower,
                 visual_prefix=VISUAL, text_aliases=(("qwen2_5_vl_text", "qwen2"), ("qwen2_5_vl", "qwen2")), mrope=True),
)}
VISION_ARCHITECTURES = {f.architecture: f.model_type for f in VISION_FAMILIES.values()}


def image_token_id(cfg: dict[str, Any], family: VisionFamily) -> int:
    value = cfg.get("image_token_id", cfg.get("image_token_index", family.default_image_token_id))
    return int(value)
