"""llama.cpp itself (llama-cpp-python, `make test-llamacpp`) runs our GGUF exports of the real
SmolLM2: same prompt tokens, and greedy answers equal to velotune's."""
from __future__ import annotations

import pytest
import torch

from velotune.export import export
from velotune.loaders import default_model_path

pytestmark = pytest.mark.llamacpp

PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp is not importable: build it with `make test-llamacpp` "
                    "(pip install llama-cpp-python, about 5 minutes)")
    return llama_cpp


def llama_cpp_answer(llm, prompt: list[int], stops: list[int]) -> list[int]:
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if token in stops or len(out) == MAX_TOKENS:
            break
        out.append(token)
    return out


def test_f16_export_answers_like_velotune(tmp_path, smollm2, llama_cpp):
    model, tokenizer = smollm2
    path = export(model, to="gguf", quant="f16", out=tmp_path / "m.gguf", tokenizer=tokenizer)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    stops = tokenizer.stop_token_ids
    for question in PROMPTS:
        conversation = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, stop_token_ids=stops)
        ours = [t for t in ours[0, len(prompt):].tolist() if t not in stops]
        assert llama_cpp_answer(llm, prompt, stops) == ours, question


def test_q4_1_export_reproduces_the_shipped_file(tmp_path, smollm2, llama_cpp):
    """The default model was loaded from a Q4_1 file; re-exported as q4_1 its blocks come out
    the same, so llama.cpp answers exactly as with the shipped file."""
    model, tokenizer = smollm2
    path = export(model, to="gguf", quant="q4_1", out=tmp_path / "m.gguf", tokenizer=tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True)
    answers = [llama_cpp_answer(llama_cpp.Llama(model_path=str(p), n_ctx=256, n_threads=2, verbose=False),
                                prompt, tokenizer.stop_token_ids) for p in (path, default_model_path())]
    assert answers[0] == answers[1] and len(answers[0]) > 3
