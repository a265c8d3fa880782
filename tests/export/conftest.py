"""Shared models for the export tests: the real SmolLM2 (loaded once) and tiny random models of
every family that use SmolLM2's real tokenizer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import velotune
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer

sys.path.insert(0, str(Path(__file__).parent))  # go_template.py

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
# Hugging Face spelling, one per family (quirks on), as ModelConfig.from_hf_config reads it.
FAMILIES = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=True),
    "llama3-rope": dict(model_type="llama", attention_bias=True, tie_word_embeddings=False, head_dim=64,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64), rope_theta=500000.0),
    "mistral": dict(model_type="mistral", head_dim=32, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", num_key_value_heads=4, sliding_window=6, original_max_position_embeddings=256,
                 tie_word_embeddings=False),
    "phi4": dict(model_type="phi3", rope_theta=250000.0, tie_word_embeddings=False),
    "mistral-small": dict(model_type="mistral", head_dim=24, rope_theta=1e8, tie_word_embeddings=False),
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=7, head_dim=16, sliding_window=4,
                   query_pre_attn_scalar=16, rope_theta=1e6, rope_local_base_freq=10000.0,
                   rope_scaling=dict(rope_type="linear", factor=8.0)),
    "smollm3": dict(model_type="smollm3", num_hidden_layers=4, rope_theta=2e6),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=16, num_experts=5, num_experts_per_tok=2,
                      moe_intermediate_size=40, norm_topk_prob=True, tie_word_embeddings=False),
    # gpt-oss's YaRN with the correction range llama.cpp computes (truncate: true)
    "gpt_oss": dict(model_type="gpt_oss", head_dim=16, num_local_experts=5, num_experts_per_tok=2, intermediate_size=40,
                    sliding_window=4, rope_theta=150000.0, tie_word_embeddings=False,
                    rope_scaling=dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=64,
                                      beta_fast=32.0, beta_slow=1.0, truncate=True)),
}


@pytest.fixture(scope="session")
def smollm2():
    model, tokenizer = velotune.load_model(dtype=torch.float32, device="cpu")
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


def tiny_model(family: str, vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    """A random float32 model of the family; norms and biases random too, so offsets and biases
    matter."""
    config = ModelConfig.from_hf_config({**TINY, **FAMILIES[family], "vocab_size": vocab_size, **overrides}, family)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if ("norm" in name or name.endswith("bias")) else 0.1)
    return model.eval()


def hf_source(config_class: str, folder: Path, **config) -> Transformer:
    """A tiny random transformers model (vocabulary 160, 2 layers) saved to `folder` and loaded by
    us (so ModelConfig.source is set); norms random around 1, and the experts, routers and sinks
    (which transformers starts at zero or near it) random too."""
    import transformers

    cfg = getattr(transformers, config_class)(**{**dict(
        vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2), **config})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "experts" in name or "router" in name or name.endswith("mlp.gate.weight") or "sinks" in name:
                p.normal_(0.0, 0.2)
    ref.save_pretrained(folder)
    model, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    return model.eval()


def assert_transformers_matches(model: Transformer, folder: Path, atol: float = 1e-5) -> None:
    """transformers (the oracle) loads the exported folder and computes the model's logits."""
    import transformers

    ids = sample_ids(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids).logits
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
    scale = ours.abs().max()
    assert (ours - ref).abs().max() <= atol * scale, float((ours - ref).abs().max() / scale)


def merged_export(model: Transformer, out: Path) -> set[str]:
    """Export `model` as a merged HF folder, check the live model is left as it was (adapters are
    merged on the side) and that transformers computes its logits; the tensor names written."""
    from safetensors import safe_open

    from velotune.export import export

    before = {n: p.clone() for n, p in model.named_parameters()}
    export(model, to="hf", out=out)
    assert_transformers_matches(model, out)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def sample_ids(vocab_size: int, seed: int = 1, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (2, length), generator=g)


CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
          "Numbers like 12345 and 678 appear too.", "Export the model to GGUF and run it with llama.cpp.",
          "user assistant system: a short chat about cats, dogs and the sea."] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def trained_tokenizer(byte_fallback: bool):
    """A tokenizers-built tiny BPE: byte-level (GGUF "gpt2") or SentencePiece-style with byte
    fallback and ▁ for spaces (GGUF "llama"), with SmolLM2's chat template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    from velotune.tokenizer import Tokenizer

    if byte_fallback:
        backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
        specials = ["<unk>", *SPECIALS]
    else:
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = []
        specials = SPECIALS
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=[] if byte_fallback else pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    if byte_fallback:  # byte tokens belong to the BPE vocabulary itself, as in converted SentencePiece models
        spec = json.loads(backend.to_str())
        vocab = spec["model"]["vocab"]
        vocab.update({token: len(vocab) + i for i, token in enumerate(alphabet)})
        backend = Backend.from_str(json.dumps(spec))
    template = (Path(__file__).parents[1] / "fixtures/chat_templates/smollm2.jinja").read_text()
    return Tokenizer(backend, chat_template=template, bos_token="<|im_start|>", eos_token="<|im_end|>",
                     unk_token="<unk>" if byte_fallback else None, add_bos_token=byte_fallback)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return trained_tokenizer(byte_fallback=False)


@pytest.fixture(scope="session")
def sp_tokenizer():
    return trained_tokenizer(byte_fallback=True)
