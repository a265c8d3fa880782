"""llama.cpp's separate projector file (`mmproj`) for the GGUF export of a vision-language model.

llama.cpp runs a vision-language model from two files: the decoder as an ordinary text GGUF
(`gguf.py`, the vision tensors left out) and the vision tower plus projector as a GGUF of
architecture "clip", which its multimodal library (libmtmd, `--mmproj`) loads. This module writes
the second file the way llama.cpp's converter lays it out, with gguf-py's writer:
- names: `v.patch_embd`, `v.class_embd`, `v.position_embd`, `v.pre_ln`, `v.post_ln`,
  `v.blk.N.{ln1,attn_q,attn_k,attn_v,attn_out,ln2,ffn_up,ffn_down}` for the tower; `mm.0` and
  `mm.2` for LLaVA's two-layer MLP (projector type `mlp`), `mm.soft_emb_norm` and
  `mm.input_projection` for Gemma 3's pooled projector (projector type `gemma3`);
- values: what the model computes with (adapters on the projector or the tower merged, through
  `weights.plan_tensors`); Gemma 3's (1 + w) norm stored as 1 + w (llama.cpp multiplies by the
  weight), its projection matrix in Hugging Face's [vision, text] orientation (llama.cpp
  transposes it in the graph);
- types: the 2-D matrices of the attention, MLP and projector in f16 (f32 for an f32 export),
  everything else (patch convolution, position and class embeddings, norms, biases) in f32;
- metadata: the tower's shape, the image size, mean and std (from the model's processor), the
  activation (`clip.use_gelu`: true for GELU, false for CLIP's quick GELU), Gemma 3's pooling
  factor, and the feature layer where LLaVA's default (the second-to-last layer) is not the one.

What llama.cpp's graphs cannot express is refused before anything is written: a projector kind
without a llama.cpp graph here, a LLaVA feature strategy that keeps a class token or drops a
patch (llama.cpp drops the class token exactly when the tower has one), a bias-free or non-GELU MLP, a Gemma 3 tower read before its last layer. Two differences
are inherent to llama.cpp and not refused: it computes GELU with the tanh approximation (LLaVA's
projector uses the exact one; relative differences near 1e-3), and it resizes images itself to the
square `image_size` (LLaVA: padded to a square first) rather than by the processor's shortest-edge
resize and centre crop; on an image already at `image_size` both see the same pixels, which is how
tests/export/test_mmproj.py compares llama.cpp's image embeddings with ours.

A known llama.cpp defect affects CLIP towers (those with a class token, LLaVA's usual one): its
LLaVA graph appends the class embedding after the patches while still adding position rows and
picking output rows as if it came first (ggml-org/llama.cpp#25814; a one-line fix is proposed in
#25844), so patch 0 is dropped and the class token reaches the decoder. The defect is in the graph,
not the file: the issue reproduces it with the LLaVA files llama.cpp's own tests download. The test
accepts either order, so it keeps passing once llama.cpp is fixed; SigLIP towers are unaffected.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

from velotune.export.errors import ExportError
from velotune.export.progress import track
from velotune.export.weights import PlannedTensor, plan_tensors
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.models.vision import VisionConfig

Q = GGMLQuantizationType
MMPROJ_ARCH = "clip"
# The families whose tower llama.cpp's graph computes as ours does (the projector kind alone does not
# tell: Qwen2.5-VL's merger is an "mlp" too, over a windowed tower with 2-D RoPE that the LLaVA graph lacks).
MMPROJ_FAMILIES = ("llava", "gemma3")
# our projector kind (models/vision.py) -> llama.cpp's clip.projector_type
PROJECTOR_TYPES = {"mlp": "mlp", "pool_norm_linear": "gemma3"}
FEATURE_LAYER_KEY = "clip.vision.feature_layer"    # not among gguf-py's constants
GELU_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")   # llama.cpp's ggml_gelu (tanh approximation)
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
TOWER, PROJECTOR = "vision_tower.", "multi_modal_projector."
# our module path under the tower / projector -> llama.cpp's
TOWER_NAMES = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
               "pre_layrnorm": "v.pre_ln", "post_layernorm": "v.post_ln"}
LAYER_NAMES = {"layer_norm1": "ln1", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "layer_norm2": "ln2",
               "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
PROJECTOR_NAMES = {"linear_1": "mm.0", "linear_2": "mm.2", "mm_soft_emb_norm": "mm.soft_emb_norm",
                   "mm_input_projection": "mm.input_projection"}


def mmproj_path(text_gguf: Path) -> Path:
    """Where the projector file goes beside the decoder's: `<name>-mmproj.gguf`."""
    return text_gguf.with_name(f"{text_gguf.stem}-mmproj.gguf")


def feature_stop(vision: VisionConfig) -> int:
    """How many tower layers feed the projector (0 = the embeddings alone)."""
    return vision.feature_layer % (vision.num_hidden_layers + 1)


def check_mmproj(config: ModelConfig, processor: Any) -> str:
    """llama.cpp's projector type for this model, or an ExportError naming what its graph cannot
    compute as the model does."""
    kind, vision = config.multimodal_type, config.vision
    if vision is None:
        raise ExportError(f"{config.model_type}: not a vision-language model; there is no projector to write")
    if kind not in MMPROJ_FAMILIES:
        raise ExportError(f"{kind}: velotune writes llama.cpp's mmproj file only for LLaVA and Gemma 3 models "
                          f"(their towers are the ones llama.cpp's graphs here compute as velotune does); "
                          "export --to hf")
    if vision.projector not in PROJECTOR_TYPES:
        raise ExportError(f"{kind}: velotune writes llama.cpp's mmproj only for LLaVA (mlp) and Gemma 3 "
                          f"projectors, not {vision.projector!r}; export --to hf")
    if vision.num_channels != 3:
        raise ExportError(f"{kind}: llama.cpp feeds the tower RGB images; this one takes {vision.num_channels} "
                          "channels")
    if vision.hidden_act not in ("quick_gelu", *GELU_ACTIVATIONS):
        raise ExportError(f"{kind}: llama.cpp's vision MLP has no {vision.hidden_act!r} activation")
    layers, stop = vision.num_hidden_layers, feature_stop(vision)
    if vision.projector == "mlp":
        if vision.drop_class_token != vision.class_token:
            raise ExportError(f"{kind}: llama.cpp's LLaVA graph drops the class token exactly when the tower has "
                              "one; vision_feature_select_strategy "
                              f"{'full' if vision.class_token else 'default'} cannot be expressed")
        if not vision.projector_bias:
            raise ExportError(f"{kind}: llama.cpp's LLaVA projector adds biases; multimodal_projector_bias=false "
                              "cannot be expressed")
        if vision.projector_act not in GELU_ACTIVATIONS:
            raise ExportError(f"{kind}: llama.cpp's LLaVA projector uses GELU, this model "
                              f"{vision.projector_act!r}")
        if stop == 0:
            raise ExportError(f"{kind}: vision_feature_layer {vision.feature_layer} reads the embeddings, before "
                              "any tower layer; llama.cpp's LLaVA graph cannot stop there")
    elif stop != layers:
        raise ExportError(f"{kind}: llama.cpp's Gemma 3 graph runs every tower layer; this model reads layer "
                          f"{vision.feature_layer}")
    if processor is None:
        raise ExportError(f"{kind}: the mmproj file needs the image processor's mean and std "
                          "(preprocessor_config.json next to the model)")
    if not processor.do_normalize or not processor.do_rescale or not math.isclose(processor.rescale_factor, 1 / 255):
        raise ExportError(f"{kind}: llama.cpp scales pixels by 1/255 and normalises them; this processor's "
                          f"do_rescale={processor.do_rescale}, rescale_factor={processor.rescale_factor}, "
                          f"do_normalize={processor.do_normalize} cannot be expressed")
    return PROJECTOR_TYPES[vision.projector]


def mmproj_tensor_name(name: str) -> str:
    """Our parameter name (under vision_tower. or multi_modal_projector.) -> llama.cpp's."""
    path, kind = name.rsplit(".", 1)
    if name == TOWER + "embeddings.class_embedding":
        return "v.class_embd"
    if path.startswith(TOWER):
        inner = path[len(TOWER):]
        if inner in TOWER_NAMES:
            return f"{TOWER_NAMES[inner]}.{kind}"
        parts = inner.split(".")
        module = ".".join(parts[3:])
        if parts[:2] == ["encoder", "layers"] and module in LAYER_NAMES:
            return f"v.blk.{parts[2]}.{LAYER_NAMES[module]}.{kind}"
    elif path.startswith(PROJECTOR) and path[len(PROJECTOR):] in PROJECTOR_NAMES:
        return f"{PROJECTOR_NAMES[path[len(PROJECTOR):]]}.{kind}"
    raise ExportError(f"tensor {name!r} has no name in llama.cpp's mmproj format")


def mmproj_layout(name: str, w: torch.Tensor) -> torch.Tensor:
    """A tensor as llama.cpp's graph reads it: Gemma 3's norm as 1 + w, its projection [vision, text]."""
    if name.endswith("mm_soft_emb_norm.weight"):
        return w + 1.0
    if name.endswith("mm_input_projection.weight"):
        return w.t().contiguous()
    return w


def mmproj_type(gguf_name: str, ndim: int, quant: str) -> Q:
    """f16 for the 2-D matrices of the attention, MLP and projector (f32 in an f32 export), f32 for the rest."""
    matrix = ndim == 2 and gguf_name.endswith(".weight") and (".blk." in gguf_name or gguf_name.startswith("mm."))
    return Q.F16 if matrix and quant != "f32" else Q.F32


def plan_mmproj(model: Transformer, quant: str) -> list[tuple[str, tuple[int, ...], Q, Callable[[], np.ndarray]]]:
    """(llama.cpp name, shape, type, read) of every tensor the projector file holds, in model order."""
    vision = model.config.vision
    assert vision is not None
    skip = set()
    if not (vision.post_norm_on_features and feature_stop(vision) == vision.num_hidden_layers):
        skip = {TOWER + "post_layernorm.weight", TOWER + "post_layernorm.bias"}   # the model never applies it

    def reader(t: PlannedTensor) -> Callable[[], np.ndarray]:
        return lambda: mmproj_layout(t.name, t.read()).numpy()

    planned = []
    for t in plan_tensors(model):
        if not t.name.startswith(VISION_PREFIXES) or t.name in skip:
            continue
        name = mmproj_tensor_name(t.name)
        shape = t.shape[::-1] if t.name.endswith("mm_input_projection.weight") else t.shape
        planned.append((name, tuple(shape), mmproj_type(name, len(shape), quant), reader(t)))
    return planned


def write_mmproj_metadata(writer: GGUFWriter, config: ModelConfig, projector_type: str, processor: Any,
                          quant: str) -> None:
    vision = config.vision
    assert vision is not None
    writer.add_file_type(int(LlamaFileType.ALL_F32 if quant == "f32" else LlamaFileType.MOSTLY_F16))
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(projector_type)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(vision.num_hidden_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_projection_dim(vision.text_hidden_size)
    writer.add_vision_image_mean([float(x) for x in processor.image_mean])
    writer.add_vision_image_std([float(x) for x in processor.image_std])
    writer.add_vision_use_gelu(vision.hidden_act in GELU_ACTIVATIONS)
    stop = feature_stop(vision)
    if projector_type == "mlp" and stop != vision.num_hidden_layers - 1:
        writer.add_array(FEATURE_LAYER_KEY, [stop])      # llama.cpp's default is the second-to-last layer
    if projector_type == "gemma3":
        writer.add_vision_projector_scale_factor(vision.patches_per_side // math.isqrt(vision.tokens_per_image))


def save_mmproj(model: Transformer, tokenizer: Any, out: Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write the vision tower and projector of `model` (adapters merged) as llama.cpp's mmproj file `out`."""
    config = model.config
    processor = getattr(tokenizer, "image_processor", None)
    projector_type = check_mmproj(config, processor)
    tensors = plan_mmproj(model, quant)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), MMPROJ_ARCH)
    if name:
        writer.add_name(name)
    write_mmproj_metadata(writer, config, projector_type, processor, quant)
    for gguf_name, shape, qtype, _ in tensors:
        dtype = np.float16 if qtype == Q.F16 else np.float32
        writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with torch.no_grad():
        for gguf_name, _, qtype, read in track(tensors, len(tensors), "mmproj"):
            writer.write_tensor_data(np.ascontiguousarray(read(), dtype=np.float16 if qtype == Q.F16 else np.float32))
    writer.close()
    return out
