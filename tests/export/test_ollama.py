"""Ollama export: each family's jinja chat template (tests/fixtures/chat_templates) is restated as
a Go template that renders the same conversations, checked with a small Go-template evaluator
under Ollama's request handling; the Modelfile carries the stop tokens and sampling defaults."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_model
from go_template import ollama_prompt
from tokenizers import Tokenizer as Backend
from tokenizers import models

import velotune
from velotune.export import ExportError, export
from velotune.export.chat_format import detect_chat_format, render_jinja
from velotune.export.ollama import modelfile
from velotune.tokenizer import Tokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "chat_templates"
# family -> (bos, eos, end-of-turn marker, recognised family)
FAMILY_TOKENS = {
    "smollm2": ("<|im_start|>", "<|endoftext|>", "<|im_end|>", "ChatML"),
    "qwen2": ("<|endoftext|>", "<|endoftext|>", "<|im_end|>", "ChatML"),
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "Llama 3"),
    "mistral": ("<s>", "</s>", "</s>", "Mistral"),
    "gemma2": ("<bos>", "<eos>", "<end_of_turn>", "Gemma"),
    "phi3": ("<s>", "<|endoftext|>", "<|end|>", "Phi-3"),
    "gemma3": ("<bos>", "<eos>", "<end_of_turn>", "Gemma"),
    "smollm3": ("<|begin_of_text|>", "<|im_end|>", "<|im_end|>", "ChatML"),
    "phi4": ("<|endoftext|>", "<|im_end|>", "<|im_end|>", "Phi-4"),
    "mistral-small3": ("<s>", "</s>", "</s>", "Mistral (system prompt)"),
}
WITH_DEFAULT_SYSTEM = ("smollm2", "qwen2", "smollm3", "mistral-small3")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Arr, matey!"}, {"role": "user", "content": "Where is the gold?"},
     {"role": "assistant", "content": "Buried."}, {"role": "user", "content": "Where exactly?"}],
]


def family_tokenizer(family: str) -> Tokenizer:
    bos, eos, end_of_turn, _ = FAMILY_TOKENS[family]
    specials = list(dict.fromkeys([bos, eos, end_of_turn]))
    backend = Backend(models.WordLevel({"[UNK]": 0, **{t: i + 1 for i, t in enumerate(specials)}}, unk_token="[UNK]"))
    return Tokenizer(backend, chat_template=(FIXTURES / f"{family}.jinja").read_text(), bos_token=bos, eos_token=eos)


@pytest.mark.parametrize("family", sorted(FAMILY_TOKENS))
def test_go_template_renders_like_the_jinja_template(family):
    bos, eos, _, name = FAMILY_TOKENS[family]
    template = (FIXTURES / f"{family}.jinja").read_text()
    fmt = detect_chat_format(template, bos, eos)
    assert fmt.family.name.startswith(name)
    compared = 0
    for conversation in CONVERSATIONS:
        if family == "gemma2" and conversation[0]["role"] == "system":
            continue  # Gemma 2's template refuses system messages
        want = render_jinja(template, conversation, bos, eos)
        assert ollama_prompt(fmt.go_template(), conversation, fmt.default_system) == want, conversation
        compared += 1
    assert compared >= 2


def test_smollm3_system_turn_keeps_its_metadata_preamble_and_open_end():
    """SmolLM3's system turn: a dated metadata preamble before the text, a blank line and no
    end-of-turn marker after it (as its template writes it without tools)."""
    fmt = detect_chat_format((FIXTURES / "smollm3.jinja").read_text(), "<|begin_of_text|>", "<|im_end|>")
    assert fmt.system_prefix.startswith("<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n")
    assert fmt.system_suffix == "\n\n" and fmt.default_system.startswith("You are a helpful AI assistant")
    prompt = ollama_prompt(fmt.go_template(), CONVERSATIONS[1], fmt.default_system)
    assert prompt.endswith("## Custom Instructions\n\nBe brief.\n\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                           "<|im_start|>assistant\n")


def test_gemma2_system_prompt_goes_into_the_first_user_turn():
    fmt = detect_chat_format((FIXTURES / "gemma2.jinja").read_text(), "<bos>", "<eos>")
    prompt = ollama_prompt(fmt.go_template(), CONVERSATIONS[1], None)
    assert prompt == "<start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("family", sorted(FAMILY_TOKENS))
def test_modelfile_stops_and_sampling(family):
    _, eos, end_of_turn, _ = FAMILY_TOKENS[family]
    tokenizer = family_tokenizer(family)
    fmt = detect_chat_format(tokenizer.chat_template, tokenizer.bos_token, eos)
    text = modelfile(fmt, tokenizer, {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "max_length": 99})
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf" and lines[1].startswith('TEMPLATE """')
    assert f'PARAMETER stop "{end_of_turn}"' in lines and f'PARAMETER stop "{eos}"' in lines
    assert {"PARAMETER temperature 0.2", "PARAMETER top_p 0.9", "PARAMETER top_k 40"} <= set(lines)
    assert not any("max_length" in line for line in lines)
    assert any(line.startswith("SYSTEM ") for line in lines) == (family in WITH_DEFAULT_SYSTEM)


def test_ollama_export_writes_gguf_and_modelfile(tmp_path, bpe_tokenizer):
    model = tiny_model("llama", len(bpe_tokenizer))
    path = export(model, to="ollama", out=tmp_path / "ollama", tokenizer=bpe_tokenizer,
                  generation_config={"temperature": 0.7})
    assert path == tmp_path / "ollama" / "Modelfile"
    text = path.read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0.7" in text
    back, _ = velotune.load_model(tmp_path / "ollama" / "model.gguf", device="cpu")
    assert back.config.num_hidden_layers == 2


def test_unknown_template_fails_before_writing(tmp_path, bpe_tokenizer):
    model = tiny_model("llama", len(bpe_tokenizer))
    bpe_tokenizer_copy = Tokenizer(bpe_tokenizer.backend, chat_template=(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"),
        bos_token="<|im_start|>", eos_token="<|im_end|>")
    with pytest.raises(ExportError, match="chat template not recognised.*### user"):
        export(model, to="ollama", out=tmp_path / "o", tokenizer=bpe_tokenizer_copy)
    assert not (tmp_path / "o").exists()
