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
# Parameters Hugging Face keeps as bare matrices that we hold as nn.Linear weights (transposed).
TRANSPOSED = {"multi_modal_projector.mm_input_projection_weight": "multi_modal_projector.mm_input_projection.weight"}


def to_ours(name: str) -> tuple[str, bool]:
    """(our parameter name, whether the tensor is stored transposed) of a checkpoint tensor name."""
    for prefix, ours in READ_PREFIXES:
        if name.startswith(prefix):
            name = ours + name[len(prefix):]
            break
    if name in TRANSPOSED:
        return TRANSPOSED[name], True
    return name, False


def to_hf(name: str, family: VisionFamily) -> tuple[str, bool]:
    """(transformers 5.25's checkpoint name for the family, whether to write the tensor
    transposed) of ours."""
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


def transformers_name(name: str) -> str:
    """Our parameter or module path as transformers 5 names it in a vision-language model's memory;
    `to_ours` reads it back."""
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

    def vision_config(self, cfg: dict[str, Any], text_hidden: int, path: str) -> VisionConfig:
        vision = cfg.get("vision_config")
        if not isinstance(vision, dict):
            raise ConfigError(f"{path}: a {self.model_type} config needs a vision_config")
        fields = _tower(vision, path)
        fields.update(self.projector(cfg, text_hidden, path))
        return VisionConfig(text_hidden_size=text_hidden, **fields)


VISION_FAMILIES: dict[str, VisionFamily] = {f.model_type: f for f in (
    VisionFamily("llava", "LlavaForConditionalGeneration", "llama", _llava, 32000),
    VisionFamily("gemma3", "Gemma3ForConditionalGeneration", "gemma3_text", _gemma3, 262_144,
                 placeholder="<start_of_image>", expansion="\n\n<start_of_image>{tokens}<end_of_image>\n\n",
                 bidirectional_images=True,
                 write_prefixes=(("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))),
)}
VISION_ARCHITECTURES = {f.architecture: f.model_type for f in VISION_FAMILIES.values()}


def image_token_id(cfg: dict[str, Any], family: VisionFamily) -> int:
    value = cfg.get("image_token_id", cfg.get("image_token_index", family.default_image_token_id))
    return int(value)
