"""GGUF export of a vision-language model: the decoder's GGUF plus llama.cpp's mmproj file.

Tiny random LLaVA (CLIP tower), Gemma 3 (SigLIP tower) and Qwen2.5-VL models, their vision weights
made random so every tensor matters (Qwen2.5-VL's own file contents, metadata and refusals:
test_mmproj_qwen25_vl.py). Without llama.cpp: the mmproj file read back with gguf-py holds every
tower and projector weight under llama.cpp's name, in its layout, with the metadata llama.cpp
requires (values from the model folder's config.json and preprocessor_config.json); the decoder's
file holds no vision tensor; what llama.cpp cannot compute is refused before any file exists; the
Ollama Modelfile names the projector. With llama.cpp (`make test-llamacpp`): libmtmd loads the
two files, encodes a real photograph (scikit-image's astronaut, at a size both sides leave as it
is, so both see the same pixels: the tower's square for LLaVA and Gemma 3; 224 x 168 for
Qwen2.5-VL, multiples of 28 pixels giving 48 image tokens, inside llama.cpp's 8..4096 and the test
processor's 4..64) to the image embeddings our tower and projector compute, and the decoder answers
a prompt holding the image (Gemma 3 and Qwen2.5-VL, whose towers llama.cpp computes as we do: with
velotune's logits and greedy tokens; Qwen2.5-VL's decoder with its M-RoPE positions for the image).
"""
from __future__ import annotations

import ctypes
import functools
import json

import numpy as np
import pytest
import torch
from tests.vision.vlm_helpers import make_gemma3_vlm, make_qwen25_vlm, make_vlm_model

import velotune
from velotune.cli import main
from velotune.export import ExportError, export

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("skimage")

# Qwen2.5-VL with llama.cpp's fixed 112-pixel windows and room for the 48-token photograph
MAKERS = {"llava": make_vlm_model, "gemma3": make_gemma3_vlm,
          "qwen2_5_vl": functools.partial(make_qwen25_vlm, window_size=112, max_pixels=28 * 28 * 64)}
QWEN_PHOTO = (224, 168)    # width, height: 16 x 12 patches, 8 x 6 tokens, windows of 4 x 4 tokens and edge ones
LAYER_NAMES = {"layer_norm1": "ln1", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "layer_norm2": "ln2",
               "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def vision_language_model(tmp_path, family: str, **options):
    """(model folder, model, tokenizer): a GGUF-able tokenizer, the vision weights made random."""
    folder = MAKERS[family](tmp_path / f"{family}-model", gpt2_split=True, **options)
    model, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_tower.", "multi_modal_projector.")):
                p.add_(torch.randn(p.shape, generator=generator) * (0.2 if p.ndim == 1 else 0.1))
    return folder, model.eval(), tokenizer


def expected_tensors(model) -> dict[str, np.ndarray]:
    """llama.cpp's name -> the value the mmproj file must hold, spelled out per parameter."""
    v = model.config.vision
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    out = {"v.patch_embd.weight": params["vision_tower.embeddings.patch_embedding.weight"],
           "v.position_embd.weight": params["vision_tower.embeddings.position_embedding.weight"]}
    for i in range(v.num_hidden_layers):
        for ours, theirs in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"v.blk.{i}.{theirs}.{kind}"] = params[f"vision_tower.encoder.layers.{i}.{ours}.{kind}"]
    if v.class_token:          # CLIP
        out["v.class_embd"] = params["vision_tower.embeddings.class_embedding"]
    if v.patch_bias:           # SigLIP
        out["v.patch_embd.bias"] = params["vision_tower.embeddings.patch_embedding.bias"]
    for kind in ("weight", "bias"):
        if v.pre_norm:         # CLIP
            out[f"v.pre_ln.{kind}"] = params[f"vision_tower.pre_layrnorm.{kind}"]
        if v.post_norm_on_features and v.feature_layer in (-1, v.num_hidden_layers):   # SigLIP read at the end
            out[f"v.post_ln.{kind}"] = params[f"vision_tower.post_layernorm.{kind}"]
        if v.projector == "mlp":
            out[f"mm.0.{kind}"] = params[f"multi_modal_projector.linear_1.{kind}"]
            out[f"mm.2.{kind}"] = params[f"multi_modal_projector.linear_2.{kind}"]
    if v.projector == "pool_norm_linear":   # Gemma's (1 + w) norm and [vision, text] matrix
        out["mm.soft_emb_norm.weight"] = 1.0 + params["multi_modal_projector.mm_soft_emb_norm.weight"]
        out["mm.input_projection.weight"] = params["multi_modal_projector.mm_input_projection.weight"].T
    return out


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("family, options", [
    ("llava", {}), ("llava", dict(siglip=True, select="full", feature_layer=-1)), ("gemma3", {})])
def test_mmproj_holds_every_vision_weight_and_the_keys_llama_cpp_reads(tmp_path, family, options, quant):
    folder, model, tokenizer = vision_language_model(tmp_path, family, **options)
    text = export(model, to="gguf", quant=quant, out=tmp_path / "out" / "model.gguf", tokenizer=tokenizer)
    mmproj = tmp_path / "out" / "model-mmproj.gguf"
    assert sorted(p.name for p in text.parent.iterdir()) == ["model-mmproj.gguf", "model.gguf"]

    reader = gguf.GGUFReader(mmproj)
    want = expected_tensors(model)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, value in want.items():
        t = got[name]
        data = np.asarray(t.data).reshape(value.shape)
        matrix = value.ndim == 2 and (".blk." in name or name.startswith("mm.")) and name.endswith("weight")
        assert t.tensor_type.name == ("F16" if matrix and quant == "f16" else "F32"), name
        if data.dtype == np.float32:
            np.testing.assert_array_equal(data, value, err_msg=name)
        else:
            np.testing.assert_array_equal(data, value.astype(np.float16), err_msg=name)

    cfg = json.loads((folder / "config.json").read_text())
    vision, text_cfg = cfg["vision_config"], cfg["text_config"]
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    meta = fields(reader)
    assert meta["general.architecture"] == "clip" and meta["clip.has_vision_encoder"] is True
    assert meta["clip.projector_type"] == {"llava": "mlp", "gemma3": "gemma3"}[family]
    for key, value in (("image_size", vision["image_size"]), ("patch_size", vision["patch_size"]),
                       ("embedding_length", vision["hidden_size"]), ("block_count", vision["num_hidden_layers"]),
                       ("feed_forward_length", vision["intermediate_size"]),
                       ("attention.head_count", vision["num_attention_heads"]),
                       ("projection_dim", text_cfg["hidden_size"])):
        assert meta[f"clip.vision.{key}"] == value, key
    assert meta["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(vision["layer_norm_eps"])
    assert meta["clip.vision.image_mean"] == pytest.approx(processor["image_mean"])
    assert meta["clip.vision.image_std"] == pytest.approx(processor["image_std"])
    assert meta["clip.use_gelu"] is (vision["hidden_act"] != "quick_gelu")
    if family == "llava":   # its default layer (the second-to-last) is llama.cpp's default; others are written
        assert meta.get("clip.vision.feature_layer", [vision["num_hidden_layers"] - 1]) == [
            cfg["vision_feature_layer"] % (vision["num_hidden_layers"] + 1)]
    else:                   # llama.cpp's Gemma 3 graph runs every layer
        assert "clip.vision.feature_layer" not in meta
    if family == "gemma3":   # 8 x 8 patches pooled to 4 x 4 tokens
        assert meta["clip.vision.projector.scale_factor"] == 2

    decoder = gguf.GGUFReader(text)
    assert not [t.name for t in decoder.tensors if t.name.startswith(("v.", "mm."))]
    assert fields(decoder)["general.architecture"] == {"llava": "llama", "gemma3": "gemma3"}[family]


def test_feature_layer_other_than_llavas_default_is_written(tmp_path):
    _, model, tokenizer = vision_language_model(tmp_path, "llava", feature_layer=-1)
    export(model, to="gguf", out=tmp_path / "m.gguf", tokenizer=tokenizer)
    assert fields(gguf.GGUFReader(tmp_path / "m-mmproj.gguf"))["clip.vision.feature_layer"] == [2]


@pytest.mark.parametrize("options, message", [
    (dict(select="full"), "vision_feature_select_strategy full"),      # keeps CLIP's class token
    (dict(siglip=True), "vision_feature_select_strategy default"),     # drops a SigLIP patch
])
def test_what_llama_cpp_cannot_compute_is_refused_before_any_file(tmp_path, options, message):
    _, model, tokenizer = vision_language_model(tmp_path, "llava", **options)
    with pytest.raises(ExportError, match=message):
        export(model, to="gguf", out=tmp_path / "out" / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("projector", "patch_merger", "graph takes the 'mlp' projector, not 'patch_merger'"),   # not the family's kind
    ("projector_act", "silu", "uses GELU"),
    ("projector_bias", False, "multimodal_projector_bias=false"),
    ("hidden_act", "relu", "no 'relu' activation"),
    ("intermediate_size", 32, "ffn_up and ffn_down swapped"),    # as wide as the tower (32)
])
def test_tower_or_projector_llama_cpp_cannot_run_is_refused(tmp_path, field, value, message):
    _, model, tokenizer = vision_language_model(tmp_path, "llava")
    setattr(model.config.vision, field, value)
    with pytest.raises(ExportError, match=message):
        export(model, to="gguf", out=tmp_path / "out" / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_a_family_without_a_llama_cpp_graph_is_refused_by_name(tmp_path):
    """A family the writer has no llama.cpp graph for (here a LLaVA relabelled as one) is refused by
    name even where its projector kind is one llama.cpp runs, since the tower may not be."""
    _, model, tokenizer = vision_language_model(tmp_path, "llava")
    model.config.multimodal_type = "some_vlm"
    with pytest.raises(ExportError, match="some_vlm: velotune writes llama.cpp's mmproj file only for LLaVA, "
                                          "Gemma 3 and Qwen2.5-VL"):
        export(model, to="gguf", out=tmp_path / "out" / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_without_image_processor_settings_it_is_refused(tmp_path):
    _, model, tokenizer = vision_language_model(tmp_path, "gemma3")
    tokenizer.image_processor = None
    with pytest.raises(ExportError, match="preprocessor_config.json"):
        export(model, to="gguf", out=tmp_path / "out" / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_cli_and_ollama_write_the_projector(tmp_path, capsys):
    folder, _, _ = vision_language_model(tmp_path, "gemma3")
    assert main(["export", str(folder), "--to", "gguf", "--out", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'g' / 'model-f16-mmproj.gguf'}" in printed
    modelfile = export(folder, to="ollama", out=tmp_path / "ollama")
    lines = modelfile.read_text().splitlines()
    assert lines[:2] == ["FROM ./model.gguf", "FROM ./model-mmproj.gguf"]
    assert fields(gguf.GGUFReader(tmp_path / "ollama" / "model-mmproj.gguf"))["general.architecture"] == "clip"


# ---------------------------------------------------------------- llama.cpp itself

@pytest.fixture(scope="module")
def mtmd():
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError:
        pytest.skip("llama_cpp is not importable: build it with `make test-llamacpp`")
    return llama_cpp, mtmd_cpp


class LlamaCppVision:
    """The decoder GGUF in llama.cpp and the mmproj file in libmtmd, on the CPU."""

    def __init__(self, mtmd, text, mmproj):
        self.llama_cpp, self.m = mtmd
        self.llm = self.llama_cpp.Llama(model_path=str(text), n_ctx=512, n_threads=2, verbose=False)
        params = self.m.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
        self.ctx = self.m.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        assert self.ctx, f"libmtmd could not load {mmproj}"

    def chunks(self, text: str, image: np.ndarray):
        """The prompt (mtmd's marker where the image goes) tokenized with the image's chunk."""
        m = self.m
        pixels = np.ascontiguousarray(image, dtype=np.uint8)
        self.bitmap = m.mtmd_bitmap_init(image.shape[1], image.shape[0],
                                         pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        self.prompt = text.encode()
        request = m.mtmd_input_text(self.prompt, len(self.prompt), False, True)
        chunks = m.mtmd_input_chunks_init()
        bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(self.bitmap)
        assert m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(request), bitmaps, 1) == 0
        return chunks

    def image_embeddings(self, image: np.ndarray, width: int) -> np.ndarray:
        m = self.m
        chunks = self.chunks(m.mtmd_default_marker().decode(), image)
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                assert m.mtmd_encode_chunk(self.ctx, chunk) == 0
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                out = np.ctypeslib.as_array(m.mtmd_get_output_embd(self.ctx), shape=(n * width,))
                return out.reshape(n, width).copy()
        raise AssertionError("no image chunk")

    def prompt_tokens(self, chunks, image_token: int) -> list[int]:
        """The tokenized prompt, each image position as `image_token`."""
        m, out = self.m, []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                tokens = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out += [tokens[j] for j in range(n.value)]
            else:
                out += [image_token] * m.mtmd_input_chunk_get_n_tokens(chunk)
        return out

    def generate(self, chunks, count: int) -> tuple[list[int], np.ndarray]:
        """Greedy tokens after the prompt, llama.cpp evaluating every chunk (the image through libmtmd),
        and the logits of the prompt's last position."""
        m, llm, lib = self.m, self.llm, self.llama_cpp
        n_past = lib.llama_pos(0)
        assert m.mtmd_helper_eval_chunks(self.ctx, llm._ctx.ctx, chunks, 0, 0, llm.n_batch, True,
                                         ctypes.byref(n_past)) == 0
        llm.n_tokens = n_past.value
        out: list[int] = []
        first = None
        while True:
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            first = logits.copy() if first is None else first
            out.append(int(logits.argmax()))
            if len(out) == count:
                return out, first
            llm.eval([out[-1]])

    def close(self):
        self.m.mtmd_free(self.ctx)
        self.llm.close()


def photograph(width: int, height: int) -> np.ndarray:
    """scikit-image's astronaut at a size llama.cpp and the processor then leave as it is."""
    import PIL.Image
    import skimage.data

    image = PIL.Image.fromarray(skimage.data.astronaut()).resize((width, height), PIL.Image.Resampling.BICUBIC)
    return np.asarray(image)


def photograph_for(model) -> np.ndarray:
    """The tower's square, or for a dynamic-resolution tower QWEN_PHOTO."""
    size = model.config.vision.image_size
    return photograph(*(QWEN_PHOTO if model.config.vision.rotary else (size, size)))


def image_arguments(processor, image: np.ndarray) -> dict[str, torch.Tensor]:
    """Our model's image arguments for the photograph: pixel_values, and a patch grid's image_grid_thw."""
    import PIL.Image

    picture = PIL.Image.fromarray(image)
    if not processor.dynamic:
        return {"pixel_values": processor.preprocess(picture)[None]}
    pixels, grid = processor.patches(picture)
    return {"pixel_values": pixels, "image_grid_thw": torch.tensor([grid])}


def class_token_last(model, pixels: torch.Tensor) -> torch.Tensor:
    """What llama.cpp's LLaVA graph computes for a CLIP tower (ggml-org/llama.cpp#25814): the class
    embedding after the patches, position rows in order, the output rows 1..patches."""
    tower, v = model.vision_tower, model.config.vision
    x = tower.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([x, tower.embeddings.class_embedding.expand(1, 1, -1)], dim=1)
    x = tower.pre_layrnorm(x + tower.embeddings.position_embedding.weight)
    for layer in tower.encoder.layers[:v.feature_layer % (v.num_hidden_layers + 1)]:
        x = layer(x)
    return model.multi_modal_projector(x[:, 1:])


@pytest.mark.llamacpp
@pytest.mark.parametrize("family, quant, options, tolerance", [
    ("gemma3", "f32", {}, 2e-3), ("gemma3", "f16", {}, 5e-3),
    ("llava", "f32", {}, 2e-3), ("llava", "f16", {}, 5e-3), ("llava", "f32", dict(feature_layer=-1), 2e-3),
    ("llava", "f32", dict(siglip=True, select="full", feature_layer=-1), 2e-3),    # post-norm applied
    ("llava", "f16", dict(siglip=True, select="full"), 5e-3),                      # second-to-last, no post-norm
    ("qwen2_5_vl", "f32", {}, 2e-3), ("qwen2_5_vl", "f16", {}, 5e-3),             # windows, edge windows, full block
    ("qwen2_5_vl", "f32", dict(window_size=0), 2e-3),                              # no windows (n_wa_pattern 0)
])
def test_llama_cpp_computes_our_image_embeddings(tmp_path, mtmd, family, quant, options, tolerance):
    """libmtmd's image embeddings for a real photograph equal our tower + projector's on the same
    pixels, within f32/f16 rounding and ggml's tanh-approximated GELU."""
    _, model, tokenizer = vision_language_model(tmp_path, family, **options)
    text = export(model, to="gguf", quant=quant, out=tmp_path / "m.gguf", tokenizer=tokenizer)
    runner = LlamaCppVision(mtmd, text, tmp_path / "m-mmproj.gguf")
    image = photograph_for(model)
    try:
        theirs = runner.image_embeddings(image, model.config.hidden_size)
    finally:
        runner.close()
    arguments = image_arguments(tokenizer.image_processor, image)
    with torch.no_grad():
        ours = [model.image_features(**arguments).reshape(-1, model.config.hidden_size).numpy()]
        if model.config.vision.class_token:     # either order passes: llama.cpp's defect, or once it is fixed
            ours.append(class_token_last(model, arguments["pixel_values"])[0].numpy())
    errors = [np.abs(o - theirs).max() / np.abs(o).max() for o in ours]
    assert theirs.shape == ours[0].shape
    assert min(errors) <= tolerance, errors


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_llama_cpp_generates_from_a_prompt_with_an_image(tmp_path, mtmd, family):
    """The two files answer a prompt holding a photograph, from the same prompt tokens as velotune's.
    Gemma 3 and Qwen2.5-VL (whose towers llama.cpp computes as we do): the same next-token logits
    after the prompt and the same greedy answer (Qwen2.5-VL: the image's tokens at M-RoPE's 2-D
    positions on both sides); LLaVA's CLIP tower meets llama.cpp's class-token defect (above), so
    its answer is only checked to be made of real tokens."""
    _, model, tokenizer = vision_language_model(tmp_path, family)
    text = export(model, to="gguf", quant="f32", out=tmp_path / "m.gguf", tokenizer=tokenizer)
    runner = LlamaCppVision(mtmd, text, tmp_path / "m-mmproj.gguf")
    processor, image = tokenizer.image_processor, photograph_for(model)
    arguments = image_arguments(processor, image)
    import PIL.Image

    count = processor.tokens_for(PIL.Image.fromarray(image))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = tokenizer.encode(prompt.replace(processor.marker, processor.image_text(count)), add_special_tokens=False)
    # libmtmd frames the image itself: Gemma 3's with <start_of_image> ... <end_of_image> (the
    # processor also puts a blank line either side), Qwen2.5-VL's with <|vision_start|> ... <|vision_end|>
    marker = runner.m.mtmd_default_marker().decode()
    theirs_marker = {"gemma3": f"\n\n{marker}\n\n"}.get(family, marker)
    try:
        chunks = runner.chunks(prompt.replace(processor.marker, theirs_marker), image)
        assert runner.prompt_tokens(chunks, model.config.image_token_id) == ours
        theirs, logits = runner.generate(chunks, count=6)
    finally:
        runner.close()
    ids = torch.tensor([ours])
    answer = model.generate(ids, max_new_tokens=6, **arguments)[0, len(ours):].tolist()
    assert len(theirs) == 6 and all(0 <= t < model.config.vocab_size for t in theirs)
    if not model.config.vision.class_token:
        with torch.no_grad():
            want = model(ids, **arguments).logits[0, -1].numpy()
        assert np.abs(logits - want).max() <= 2e-3 * np.abs(want).max()
        assert theirs == answer
