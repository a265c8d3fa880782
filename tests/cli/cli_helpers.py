"""A tiny chat model folder for end-to-end command tests: a random 2-layer Llama (transformers
writes it) with a byte-level tokenizer (259 ids: 3 ChatML specials + 256 bytes) and a ChatML
chat template, so `velotune.load_model(folder)` returns a model and a real `Tokenizer`."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from velotune.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer(gpt2_split: bool = False) -> Tokenizer:
    """`gpt2_split`: split text GPT-2's way before the bytes (a pre-tokenizer GGUF can name)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(alphabet))}
    merges = []
    if gpt2_split:   # one merge, so the vocabulary is a BPE a GGUF can carry (it needs merges)
        vocab["Ġt"], merges = len(vocab), [("Ġ", "t")]
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_split)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    return Tokenizer(backend, chat_template=CHATML, bos_token=None, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>")


def make_chat_model(folder: Path, seed: int = 0, config_class: str = "LlamaConfig", gpt2_split: bool = False,
                    **overrides) -> Path:
    """`config_class` names the transformers config of the family (LlamaConfig by default);
    `overrides` set its quirks."""
    import transformers

    tokenizer = byte_tokenizer(gpt2_split)
    config = getattr(transformers, config_class)(**{**dict(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1), **overrides})
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def write_config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def train_losses(output_dir: Path) -> list[float]:
    """The training losses a run logged to its metrics file, in step order."""
    from velotune.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]
