"""llama.cpp's separate projector file (`mmproj`) for the GGUF export of a vision-language model.

llama.cpp runs a vision-language model from two files: the decoder as an ordinary text GGUF
(`gguf.py`, the vision tensors left out) and the vision tower plus projector as a GGUF of
architecture "clip", which its multimodal library (libmtmd, `--mmproj`) loads. This module writes
the second file the way llama.cpp's converter lays it out, with gguf-py's writer, for the three
families whose graph llama.cpp has (`MMPROJ_TYPES`: LLaVA, projector type `mlp`; Gemma 3,
`gemma3`; Qwen2.5-VL, `qwen2.5vl_merger`):
- names: `v.patch_embd`, `v.class_embd`, `v.position_embd`, `v.pre_ln`, `v.post_ln`,
  `v.blk.N.{ln1,attn_q,attn_k,attn_v,attn_out,ln2,ffn_gate,ffn_up,ffn_down}` for the tower;
  `mm.0` and `mm.2` for the two-layer MLP (LLaVA's projector, Qwen2.5-VL's patch merger, whose
  RMSNorm in front is `v.post_ln`), `mm.soft_emb_norm` and `mm.input_projection` for Gemma 3's
  pooled projector;
- pieces: a fused q/k/v projection (Qwen2.5-VL) is stored as three matrices of its rows, and a
  patch convolution over two frames as one 2-D kernel per frame (`v.patch_embd.weight` and
  `v.patch_embd.weight.1`; llama.cpp convolves a still image with both and sums, which equals
  the 3-D convolution of the image repeated over the frames, as our processor feeds it);
- values: what the model computes with (adapters on the projector or the tower merged, through
  `weights.plan_tensors`); Gemma 3's (1 + w) norm stored as 1 + w (llama.cpp multiplies by the
  weight), its projection matrix in Hugging Face's [vision, text] orientation (llama.cpp
  transposes it in the graph);
- types: the 2-D matrices of the attention, MLP and projector in f16 (f32 for an f32 export),
  everything else (patch convolution, position and class embeddings, norms, biases) in f32;
- metadata: the tower's shape, the image size (0 for Qwen2.5-VL: each image keeps its own),
  mean and std (from the model's processor), the activation (`clip.use_gelu`: true for GELU,
  false for CLIP's quick GELU; `clip.use_silu` for Qwen2.5-VL's gated SiLU), Gemma 3's pooling
  factor, the feature layer where LLaVA's default (the second-to-last layer) is not the one, and
  Qwen2.5-VL's merge size and window pattern (`clip.vision.n_wa_pattern` = n: blocks n-1, 2n-1,
  ... attend over the whole image, the others within windows).

What llama.cpp's graphs cannot express is refused before anything is written: a family without a
graph there, a projector kind other than its family's, a LLaVA feature strategy that keeps a
class token or drops a patch (llama.cpp drops the class token exactly when the tower has one), a
bias-free or non-GELU MLP, a Gemma 3 tower read before its last layer, a tower MLP as wide as the
tower (llama.cpp takes that shape for an old file with up and down swapped, and swaps them back);
for Qwen2.5-VL what its graph fixes (`check_qwen25_vl`): 2 x 2 merging, two frames, rotary base
10000, windows of 112 pixels, full-attention blocks at a fixed period, one epsilon for every norm.
Two differences are inherent to llama.cpp and not refused: it computes GELU with the tanh
approximation (LLaVA's projector and Qwen2.5-VL's merger use the exact one; relative differences
near 1e-3), and it resizes images itself: to the square `image_size` (LLaVA: padded to a square
first) rather than by the processor's shortest-edge resize and centre crop; for Qwen2.5-VL to
multiples of 28 pixels within 8..4096 image tokens, its own bounds rather than the processor's
min_pixels and max_pixels. An image both leave as it is (LLaVA, Gemma 3: at `image_size`;
Qwen2.5-VL: sides that are multiples of 28, its token count inside both bounds) gives both the
same pixels, which is how tests/export/test_mmproj.py compares llama.cpp's image embeddings with
ours.

A known llama.cpp defect affects CLIP towers (those with a class token, LLaVA's usual one): its
LLaVA graph appends the class embedding after the patches while still adding position rows and
picking output rows as if it came first (ggml-org/llama.cpp#25814; a one-line fix is proposed in
#25844), so patch 0 is dropped and the class token reaches the decoder. The defect is in the graph,
not the file: the issue reproduces it with the LLaVA files llama.cpp's own tests download. The test
accepts either order, so it keeps passing once llama.cpp is fixed; SigLIP towers are unaffected.
"""
from __future__ import annotations

import functools
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
# family (ModelConfig.multimodal_type) -> (our projector kind, llama.cpp's clip.projector_type): the
# families whose tower and projector a llama.cpp graph computes as ours do (the projector kind alone
# does not tell: Qwen2.5-VL's merger is an "mlp" too, over a windowed tower with 2-D RoPE).
MMPROJ_TYPES = {"llava": ("mlp", "mlp"), "gemma3": ("pool_norm_linear", "gemma3"),
                "qwen2_5_vl": ("mlp", "qwen2.5vl_merger")}
QWEN25_VL = MMPROJ_TYPES["qwen2_5_vl"][1]
FEATURE_LAYER_KEY = "clip.vision.feature_layer"    # not among gguf-py's constants
GELU_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")   # llama.cpp's ggml_gelu (tanh approximation)
# quick GELU (llama.cpp's default), SiLU (clip.use_silu), GELU (clip.use_gelu)
TOWER_ACTIVATIONS = ("quick_gelu", "silu", *GELU_ACTIVATIONS)
# What llama.cpp's Qwen2.5-VL graph fixes: 2 x 2 merging, the rotary base, the window in pixels,
# two frames per patch (two kernels).
QWEN_MERGE, QWEN_ROPE_THETA, QWEN_WINDOW, QWEN_FRAMES = 2, 10000.0, 112, 2
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
TOWER, PROJECTOR = "vision_tower.", "multi_modal_projector."
# our module path under the tower / projector -> llama.cpp's; a tuple: the rows split evenly among them
TOWER_NAMES = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
               "pre_layrnorm": "v.pre_ln", "post_layernorm": "v.post_ln"}
LAYER_NAMES: dict[str, str | tuple[str, ...]] = {
    "layer_norm1": "ln1", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.qkv": ("attn_q", "attn_k", "attn_v"), "self_attn.out_proj": "attn_out", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down"}
PROJECTOR_NAMES = {"linear_1": "mm.0", "linear_2": "mm.2", "norm": "v.post_ln", "mm_soft_emb_norm": "mm.soft_emb_norm",
                   "mm_input_projection": "mm.input_projection"}


def mmproj_path(text_gguf: Path) -> Path:
    """Where the projector file goes beside the decoder's: `<name>-mmproj.gguf`."""
    return text_gguf.with_name(f"{text_gguf.stem}-mmproj.gguf")


def feature_stop(vision: VisionConfig) -> int:
    """How many tower layers feed the projector (0 = the embeddings alone)."""
    return vision.feature_layer % (vision.num_hidden_layers + 1)


def window_pattern(vision: VisionConfig) -> int | None:
    """llama.cpp's `n_wa_pattern` for the tower: n when exactly the blocks i with (i + 1) % n == 0
    attend over the whole image (n past the last block: none does), 0 without windows, None when
    the full-attention blocks are not so spaced."""
    if not vision.window_size:
        return 0
    layers, full = vision.num_hidden_layers, set(vision.full_attention_layers)
    period = min(full) + 1 if full else layers + 1
    return period if full == {i for i in range(layers) if (i + 1) % period == 0} else None


def check_mmproj(config: ModelConfig, processor: Any) -> str:
    """llama.cpp's projector type for this model, or an ExportError naming what its graph cannot
    compute as the model does."""
    kind, vision = config.multimodal_type, config.vision
    if vision is None:
        raise ExportError(f"{config.model_type}: not a vision-language model; there is no projector to write")
    if kind not in MMPROJ_TYPES:
        raise ExportError(f"{kind}: velotune writes llama.cpp's mmproj file only for LLaVA, Gemma 3 and Qwen2.5-VL "
                          f"models ({', '.join(MMPROJ_TYPES)}: the families llama.cpp has graphs for); export --to hf")
    projector, projector_type = MMPROJ_TYPES[kind]
    if vision.projector != projector:
        raise ExportError(f"{kind}: llama.cpp's {projector_type!r} graph takes the {projector!r} projector, not "
                          f"{vision.projector!r}; export --to hf")
    if vision.num_channels != 3:
        raise ExportError(f"{kind}: llama.cpp feeds the tower RGB images; this one takes {vision.num_channels} "
                          "channels")
    if vision.hidden_act not in TOWER_ACTIVATIONS:
        raise ExportError(f"{kind}: llama.cpp's vision MLP has no {vision.hidden_act!r} activation")
    if vision.intermediate_size == vision.hidden_size:
        raise ExportError(f"{kind}: the tower's intermediate_size equals its hidden_size ({vision.hidden_size}); "
                          "llama.cpp reads that shape as an old file with ffn_up and ffn_down swapped and swaps them")
    layers, stop = vision.num_hidden_layers, feature_stop(vision)
    if projector_type == "mlp":
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
    elif projector_type == QWEN25_VL:
        check_qwen25_vl(kind, vision)
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
    return projector_type


def check_qwen25_vl(kind: str, vision: VisionConfig) -> None:
    """What llama.cpp's Qwen2.5-VL graph fixes, checked against the tower."""
    fixed = (("spatial_merge_size", vision.spatial_merge_size, QWEN_MERGE),
             ("temporal_patch_size", vision.temporal_patch_size, QWEN_FRAMES),
             ("rope_theta", vision.rope_theta, QWEN_ROPE_THETA))
    for field, value, want in fixed:
        if value != want:
            raise ExportError(f"{kind}: llama.cpp's Qwen2.5-VL graph has vision_config.{field} {want:g}, this "
                              f"model {value:g}")
    cell = vision.patch_size * QWEN_MERGE
    if vision.window_size and vision.window_size // cell != QWEN_WINDOW // cell:
        raise ExportError(f"{kind}: llama.cpp's Qwen2.5-VL graph attends within windows of {QWEN_WINDOW} pixels; "
                          f"this model's window_size is {vision.window_size}")
    if window_pattern(vision) is None:
        raise ExportError(f"{kind}: llama.cpp makes every n-th tower block attend fully; this model's "
                          f"fullatt_block_indexes {list(vision.full_attention_layers)} are not so spaced")
    if vision.projector_act not in GELU_ACTIVATIONS:
        raise ExportError(f"{kind}: llama.cpp's Qwen2.5-VL merger uses GELU, this model {vision.projector_act!r}")
    if not math.isclose(vision.projector_norm_eps, vision.layer_norm_eps):
        raise ExportError(f"{kind}: llama.cpp uses one epsilon for every norm of the tower; this model's merger "
                          f"norm has {vision.projector_norm_eps:g}, its blocks {vision.layer_norm_eps:g}")


def mmproj_tensor_names(name: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Our parameter name (under vision_tower. or multi_modal_projector.) -> llama.cpp's, one per
    piece the tensor is stored as (`mmproj_layout`): q/k/v apart; a patch kernel over frames
    [out, channels, frames, P, P] one per frame, the first under the plain name and the others
    with the frame's number after it (llama.cpp's `v.patch_embd.weight.1`)."""
    path, kind = name.rsplit(".", 1)
    if name == TOWER + "embeddings.class_embedding":
        return ("v.class_embd",)
    if path.startswith(TOWER):
        inner = path[len(TOWER):]
        if inner in TOWER_NAMES:
            theirs = f"{TOWER_NAMES[inner]}.{kind}"
            frames = shape[2] if len(shape) == 5 else 1
            return (theirs, *(f"{theirs}.{t}" for t in range(1, frames)))
        parts = inner.split(".")
        module = ".".join(parts[3:])
        if parts[:2] == ["encoder", "layers"] and module in LAYER_NAMES:
            pieces = LAYER_NAMES[module]
            return tuple(f"v.blk.{parts[2]}.{n}.{kind}" for n in ((pieces,) if isinstance(pieces, str) else pieces))
    elif path.startswith(PROJECTOR) and path[len(PROJECTOR):] in PROJECTOR_NAMES:
        return (f"{PROJECTOR_NAMES[path[len(PROJECTOR):]]}.{kind}",)
    raise ExportError(f"tensor {name!r} has no name in llama.cpp's mmproj format")


def mmproj_layout(name: str, w: torch.Tensor) -> list[torch.Tensor]:
    """A tensor as llama.cpp's graph reads it, in its stored pieces: q/k/v rows apart, one kernel
    per frame, Gemma 3's norm as 1 + w, its projection [vision, text]."""
    if name.endswith("mm_soft_emb_norm.weight"):
        return [w + 1.0]
    if name.endswith("mm_input_projection.weight"):
        return [w.t().contiguous()]
    if ".self_attn.qkv." in name:
        return [part.contiguous() for part in w.chunk(3)]
    if name.endswith("patch_embedding.weight") and w.dim() == 5:    # [out, channels, frames, P, P]
        return [w[:, :, t].contiguous() for t in range(w.shape[2])]
    return [w]


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

    planned = []
    for t in plan_tensors(model):
        if not t.name.startswith(VISION_PREFIXES) or t.name in skip:
            continue
        names = mmproj_tensor_names(t.name, t.shape)
        shapes = [tuple(p.shape) for p in mmproj_layout(t.name, torch.empty(t.shape, device="meta"))]
        piece = pieces_reader(t)
        for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
            planned.append((name, shape, mmproj_type(name, len(shape), quant), functools.partial(piece, i)))
    return planned


def pieces_reader(t: PlannedTensor) -> Callable[[int], np.ndarray]:
    """Piece i of `t` in llama.cpp's layout (`mmproj_layout`). The source tensor is read (adapters
    merged, a 4-bit base dequantized) once, when a piece not yet laid out is asked for, and each
    piece is let go when taken: the writer takes a tensor's pieces one after another, so a split
    tensor (q/k/v, frames) costs one read and memory stays near one tensor."""
    held: dict[int, np.ndarray] = {}

    def piece(i: int) -> np.ndarray:
        if i not in held:
            held.clear()
            held.update(enumerate(p.numpy() for p in mmproj_layout(t.name, t.read())))
        return held.pop(i)

    return piece


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
    if vision.hidden_act == "silu":
        writer.add_vision_use_silu(True)
    stop = feature_stop(vision)
    if projector_type == "mlp" and stop != vision.num_hidden_layers - 1:
        writer.add_array(FEATURE_LAYER_KEY, [stop])      # llama.cpp's default is the second-to-last layer
    if projector_type == "gemma3":
        writer.add_vision_projector_scale_factor(vision.patches_per_side // math.isqrt(vision.tokens_per_image))
    if projector_type == QWEN25_VL:
        writer.add_vision_spatial_merge_size(vision.spatial_merge_size)
        writer.add_vision_n_wa_pattern(window_pattern(vision) or 0)


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
