"""velotune.tokenizer against transformers as the oracle.

1. SmolLM2 rebuilt from its GGUF equals transformers' own GGUF tokenizer: text, and 50 generated
   conversations through the chat template (text and ids). One known, deliberate difference is
   tested on its own: a run of whitespace before a digit (see test_smollm_digits_split_first).
2. Round trips: our save() read by AutoTokenizer; transformers' save_pretrained read by us.
3. The other families' chat templates (fixtures) render like transformers' apply_chat_template.
4. SentencePiece GGUF vocabularies (Llama, Phi-3, Gemma styles) equal transformers' conversion.
5. Bad input gives errors naming the file / key.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from velotune.loaders import default_model_path
from velotune.errors import LoadError
from velotune.tokenizer import ChatTemplateError, Tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

TEXTS = [
    "Hello, world! How are you doing today?",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}",
    "a  b   c    d\t\te\n\n\nf \n \n g   ",
    "   leading and trailing spaces   ",
    "机器学习是人工智能的一个分支。你好，世界！",
    "Emoji: 😀🎉👍🏽 and family 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵",
    "Accents: café, naïve, résumé, Ångström, São Paulo, Dvořák, e\u0301 (combining)",
    "Don't stop; I'll go. We've seen it, they're here, you'd know.",
    "Pi is 3.14159, the year 2024-01-15, version v1.2.3, price $42.50",
    "<|im_start|>user\nInline special tokens<|im_end|>\n",
    "URLs: https://example.com/path?q=1&r=two#frag and emails a.b@c.org",
    "",
    "ÀÉÎÕÜ ß Ω ж ق ह 한국어 日本語 ไทย",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def ours(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(gguf_path), gguf_path)


@pytest.fixture(scope="module")
def theirs(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def hf_ids(tok, text: str, add_special_tokens: bool = True) -> list[int]:
    return tok(text, add_special_tokens=add_special_tokens)["input_ids"]


def hf_chat(tok, messages, **kwargs) -> tuple[str, list[int]]:
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    return text, list(ids)


# ---- 1. SmolLM2 GGUF vs transformers ----------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_smollm_encode_decode_match_transformers(ours, theirs, text):
    ids = ours.encode(text)
    assert ids == hf_ids(theirs, text)
    assert ours.decode(ids) == theirs.decode(ids) == text
    with_specials = [ours.bos_token_id, *ids, ours.eos_token_id]
    assert ours.decode(with_specials, skip_special_tokens=True) == theirs.decode(with_specials,
                                                                                 skip_special_tokens=True)


def test_smollm_special_tokens_match_transformers(ours, theirs):
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert len(ours) == len(theirs) == 49152
    assert ours.add_bos_token is False and ours.encode("hi") == ours.encode("hi", add_special_tokens=False)
    assert ours.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert set(theirs.all_special_ids) <= set(ours.all_special_ids) == set(range(17))


def test_smollm_digits_split_first(ours, theirs):
    """tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) cut every digit
    out before the GPT-2 split, so the two spaces before "12345" stay one piece, "ĠĠ" (256).
    transformers' GGUF conversion ignores this pre name and splits them "Ġ", "Ġ"."""
    text = "world  12345"
    expected = [ours.convert_tokens_to_ids(t) for t in ["world", "ĠĠ", "1", "2", "3", "4", "5"]]
    assert expected == [6693, 256, 33, 34, 35, 36, 37]
    assert ours.encode(text) == expected
    assert hf_ids(theirs, text) == [6693, 216, 216, 33, 34, 35, 36, 37]   # the documented difference
    assert ours.decode(expected) == text


def generated_conversations(count: int = 50, seed: int = 0) -> list[tuple[list[dict], bool]]:
    """Varied chats: system or not, 1-4 exchanges, ending on user or assistant, unicode contents.
    Contents never put two whitespace characters before a digit (the difference tested above)."""
    rng = random.Random(seed)
    systems = ["You are a terse assistant.", "Réponds en français, s'il te plaît.", "你是一个有用的助手。",
               "Answer with emoji only 🙂"]
    users = ["What's the capital of France?", "Write a haiku about autumn 🍂", "用中文解释一下递归。",
             "Fix this:\n```python\ndef f(x):\n    return x*2\n```", "Combien font 7 x 8 ?",
             "Tell me a joke about cats 🐱🐱", "  spaces around  ", "Line one\nLine two\n\nLine four",
             "Naïve café résumé — ok?", "List 3 colors.", "Ça va? 😀👍🏽"]
    answers = ["Paris.", "Leaves drift slowly\nGolden light on quiet paths\nThe year exhales 🍁",
               "递归是函数调用自身的一种方法。", "def f(x):\n    return x * 2", "7 x 8 = 56.",
               "Why did the cat sit on the computer? To keep an eye on the mouse! 🐭",
               "Red, green and blue.", "Oui, ça va très bien, merci ! 🇫🇷", "Sure:\n- one\n- two\n- three",
               "   indented answer"]
    chats = []
    for index in range(count):
        messages = [{"role": "system", "content": rng.choice(systems)}] if index % 3 == 0 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": rng.choice(users)})
            messages.append({"role": "assistant", "content": rng.choice(answers)})
        if index % 2:
            messages.pop()        # ends on the user: the case for a generation prompt
        chats.append((messages, index % 4 in (1, 3)))
    return chats


@pytest.mark.parametrize("case", range(50))
def test_smollm_chat_template_matches_transformers(ours, theirs, case):
    messages, generation_prompt = generated_conversations()[case]
    text, ids = hf_chat(theirs, messages, add_generation_prompt=generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False) == text
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == ids


def test_smollm_stop_tokens_and_offsets(ours):
    assert ours.stop_token_ids == [2]          # <|im_end|> is both EOS and the end of a turn
    text = "<|im_start|>user\nhé 你好<|im_end|>"
    ids, offsets = ours.encode_with_offsets(text)
    assert ids[0] == 1 and ids[-1] == 2
    assert offsets[0] == (0, 12) and offsets[-1] == (len(text) - 10, len(text))
    assert all(0 <= start <= end <= len(text) for start, end in offsets)


def test_stop_tokens_come_from_the_template_not_eos(ours):
    """A file whose EOS is not the turn end (like SmolLM2 files naming <|endoftext|>)."""
    other = Tokenizer(Backend.from_str(ours.backend.to_str()), chat_template=ours.chat_template,
                      bos_token="<|im_start|>", eos_token="<|endoftext|>")
    assert other.stop_token_ids == [0, 2]


# ---- 2. round trips -----------------------------------------------------------------------------

def test_save_loads_in_transformers(ours, tmp_path):
    ours.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["world  12345"]:
        assert hf_ids(loaded, text) == ours.encode(text)
        assert loaded.decode(ours.encode(text)) == text
    messages, _ = generated_conversations()[5]
    assert hf_chat(loaded, messages, add_generation_prompt=True) == (
        ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        ours.apply_chat_template(messages, add_generation_prompt=True))
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (ours.bos_token, ours.eos_token,
                                                                       ours.pad_token)


def test_folder_written_by_transformers(theirs, tmp_path):
    theirs.save_pretrained(tmp_path)
    loaded = Tokenizer.from_hf_folder(tmp_path)
    for text in TEXTS + ["world  12345"]:
        assert loaded.encode(text) == hf_ids(theirs, text)
    assert loaded.chat_template == theirs.chat_template
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token)
    for messages, generation_prompt in generated_conversations(10, seed=1):
        _, ids = hf_chat(theirs, messages, add_generation_prompt=generation_prompt)
        assert loaded.apply_chat_template(messages, add_generation_prompt=generation_prompt) == ids


def test_special_tokens_map_and_template_files(ours, tmp_path):
    """Older folders: names in special_tokens_map.json; newer: chat_template.json beside the config."""
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>", "lstrip": False}, "eos_token": "<|im_end|>"}))
    template = "{{ bos_token }}{{ messages[0].content }}"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded = Tokenizer.from_hf_folder(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
    assert loaded.encode("hi") == [1, *ours.encode("hi")]
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>hi"


# ---- 3. other families' templates -----------------------------------------------------------------

FAMILIES = {  # template fixture -> (bos, eos, extra special tokens, expected end-of-turn token)
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|eot_id|>"),
    "qwen2": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], "<|im_end|>"),
    "gemma2": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "mistral": ("<s>", "</s>", ["[INST]", "[/INST]"], "</s>"),
    "phi3": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
    "smollm2": ("<|im_start|>", "<|im_end|>", ["<|endoftext|>"], "<|im_end|>"),
    "gemma3": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "smollm3": (None, "<|im_end|>", ["<|im_start|>", "<|end_of_text|>"], "<|im_end|>"),
    "phi4": (None, "<|im_end|>", ["<|im_start|>", "<|im_sep|>", "<|endoftext|>"], "<|im_end|>"),
    "mistral-small3": ("<s>", "</s>", ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], "</s>"),
}
FAMILY_CHATS = [
    [{"role": "user", "content": "Hello! 👋"}],
    [{"role": "user", "content": "Bonjour, ça va ?"}, {"role": "assistant", "content": "Oui, très bien.  "},
     {"role": "user", "content": "  你好 \n"}],
    [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "print('hi')\n"}],
]
SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"},
               {"role": "assistant", "content": "Rayleigh scattering."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <d'une> ville & pays",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "Nom, ex. Zürich"}},
                                               "required": ["city"]}}}]


def family_pair(ours: Tokenizer, family: str):
    bos, eos, extra, _ = FAMILIES[family]
    backend = Backend.from_str(ours.backend.to_str())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in [bos, eos, *extra] if t is not None])
    template = (TEMPLATES / f"{family}.jinja").read_text()
    mine = Tokenizer(backend, chat_template=template, bos_token=bos, eos_token=eos)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(backend.to_str()),
                                                     bos_token=bos, eos_token=eos, chat_template=template)
    return mine, reference


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_templates_match_transformers(ours, family):
    mine, reference = family_pair(ours, family)
    chats = FAMILY_CHATS + ([SYSTEM_CHAT] if family != "gemma2" else [])   # Gemma 2 refuses system turns
    for messages in chats:
        for generation_prompt in (False, True):
            kwargs = {"add_generation_prompt": generation_prompt, "date_string": "26 Jul 2024"}
            text, ids = hf_chat(reference, messages, **kwargs)
            assert mine.apply_chat_template(messages, tokenize=False, **kwargs) == text
            assert mine.apply_chat_template(messages, **kwargs) == ids
    end_of_turn = FAMILIES[family][3]
    assert mine.stop_token_ids == list(dict.fromkeys([mine.eos_token_id, mine.convert_tokens_to_ids(end_of_turn)]))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])
def test_tools_render_like_transformers(ours, family):
    mine, reference = family_pair(ours, family)
    messages = [{"role": "user", "content": "Weather in Zürich?"}]
    kwargs = {"add_generation_prompt": True, "date_string": "26 Jul 2024"}
    text = reference.apply_chat_template(messages, tools=TOOLS, tokenize=False, **kwargs)
    assert "Zürich" in text and "<d'une>" in text   # tojson keeps unicode and HTML characters
    assert mine.apply_chat_template(messages, tools=TOOLS, tokenize=False, **kwargs) == text


ENVIRONMENT_TEMPLATE = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message.role == 'stop' %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {{ message.role }}: {% generation %}{{ message.content | trim }}{% endgeneration %}
{% endfor %}
{{ ns.count }} {{ tools | tojson(indent=2, sort_keys=True) }} {{ messages[0] | tojson }}
{% if strftime_now("%Y") | length != 4 %}{{ raise_exception("bad year") }}{% endif %}
"""


def test_jinja_environment_matches_transformers(ours):
    """Blocks on their own lines (trim_blocks, lstrip_blocks), break, namespace, generation, tojson."""
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(ours.backend.to_str()),
                                                     eos_token="<|im_end|>", chat_template=ENVIRONMENT_TEMPLATE)
    mine = Tokenizer(Backend.from_str(ours.backend.to_str()), chat_template=ENVIRONMENT_TEMPLATE,
                     bos_token=None, eos_token="<|im_end|>")
    messages = [{"role": "user", "content": " <b>Zürich & co</b> "}, {"role": "assistant", "content": "ok"},
                {"role": "stop", "content": "x"}, {"role": "user", "content": "never shown"}]
    text = reference.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    # lstrip_blocks strips the indentation before {% %} only; trim_blocks eats the newline after one
    assert text.startswith("    user: <b>Zürich & co</b>    assistant: ok2 [\n  {\n")
    assert mine.apply_chat_template(messages, tools=TOOLS, tokenize=False) == text


def test_template_errors_name_the_source(ours):
    mine, _ = family_pair(ours, "gemma2")
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        mine.apply_chat_template(SYSTEM_CHAT)
    broken = Tokenizer(Backend.from_str(ours.backend.to_str()), chat_template="{% for m in messages %}{{ m.content }",
                       bos_token=None, eos_token="<|im_end|>", source="folder/x")
    with pytest.raises(ChatTemplateError, match=r"folder/x: chat template line 1"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    assert broken.stop_token_ids == [2]      # no usable template: EOS only


# ---- 4. SentencePiece GGUF vocabularies -----------------------------------------------------------

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world"]


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the 256 byte tokens, then every "▁"-prefixed word built one letter at a time
    (so each token splits into two tokens), scored so that earlier pieces merge first."""
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces: list[str] = []
    for word in WORDS:
        for char in "▁" + word:
            if char not in pieces:
                pieces.append(char)
    for word in WORDS:
        spelled = "▁" + word
        for end in range(2, len(spelled) + 1):
            for piece in (spelled[:end], spelled[1:end] if end > 2 else None):
                if piece and len(piece) > 1 and piece not in pieces:
                    pieces.append(piece)
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write_sentencepiece_gguf(path: Path, architecture: str) -> None:
    tokens, scores, types = sentencepiece_vocab()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    if architecture.startswith("gemma"):
        writer.add_add_space_prefix(False)
    writer.add_chat_template((TEMPLATES / "mistral.jinja").read_text())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SP_TEXTS = ["the quick brown fox", "Hello world", "  jumps over\nthe lazy dog  ", "über 中文 dog!",
            "</s>the<s> fox", ""]


@pytest.mark.parametrize("architecture", ["llama", "phi3", "gemma2"])
def test_sentencepiece_gguf_matches_transformers(architecture, tmp_path):
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    path = tmp_path / "sp.gguf"
    write_sentencepiece_gguf(path, architecture)
    mine = Tokenizer.from_gguf(gguf.GGUFReader(path), path)
    arch, vocab, config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(arch, vocab)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **config)
    assert mine.add_bos_token and mine.bos_token == "<s>"
    for text in SP_TEXTS:
        ids = mine.encode(text)
        assert ids == hf_ids(reference, text), text
        assert ids[0] == 1
        assert mine.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert mine.encode("the quick", add_special_tokens=False) == hf_ids(reference, "the quick", False)
    chat = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the lazy dog"}]
    text, ids = hf_chat(reference, chat)
    assert mine.apply_chat_template(chat, tokenize=False) == text == "<s>[INST]hello world[/INST]the lazy dog</s>"
    assert mine.apply_chat_template(chat) == ids and ids.count(1) == 1   # the template's BOS, not doubled


def test_sentencepiece_save_round_trip(tmp_path):
    path = tmp_path / "sp.gguf"
    write_sentencepiece_gguf(path, "llama")
    mine = Tokenizer.from_gguf(gguf.GGUFReader(path), path)
    mine.save(tmp_path / "saved")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    again = Tokenizer.from_hf_folder(tmp_path / "saved")
    assert again.add_bos_token and not again.add_eos_token
    for text in SP_TEXTS:
        assert hf_ids(loaded, text) == mine.encode(text) == again.encode(text)
        assert loaded.decode(mine.encode(text)) == mine.decode(mine.encode(text))


# ---- 5. bad input -------------------------------------------------------------------------------

@pytest.fixture()
def saved_folder(ours, tmp_path) -> Path:
    ours.save(tmp_path)
    return tmp_path


def test_missing_tokenizer_json(saved_folder):
    (saved_folder / "tokenizer.json").unlink()
    with pytest.raises(LoadError, match=r"tokenizer\.json: file not found"):
        Tokenizer.from_hf_folder(saved_folder)


def test_corrupt_tokenizer_json(saved_folder):
    (saved_folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(LoadError, match=r"tokenizer\.json: not a valid tokenizers file .*line 1"):
        Tokenizer.from_hf_folder(saved_folder)


def test_malformed_tokenizer_config(saved_folder):
    (saved_folder / "tokenizer_config.json").write_text('{\n  "bos_token": "<|im_start|>",,\n}')
    with pytest.raises(LoadError, match=r"tokenizer_config\.json, line 2: not valid JSON .*column"):
        Tokenizer.from_hf_folder(saved_folder)


def test_missing_tokenizer_config(saved_folder):
    (saved_folder / "tokenizer_config.json").unlink()
    with pytest.raises(LoadError, match=r"tokenizer_config\.json: file not found"):
        Tokenizer.from_hf_folder(saved_folder)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("eos_token", "<|no such token|>", r"eos_token '<\|no such token\|>' is not in the vocabulary"),
    ("bos_token", 7, r"bos_token must be a string"),
    ("add_bos_token", "yes", r"add_bos_token must be true or false"),
    ("chat_template", {"default": "x"}, r"chat_template must be a string or a list"),
])
def test_bad_config_values_name_the_key(saved_folder, field, value, message):
    path = saved_folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(LoadError, match=rf"tokenizer_config\.json: {message}"):
        Tokenizer.from_hf_folder(saved_folder)


def test_add_bos_without_bos_token(saved_folder):
    path = saved_folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    del config["bos_token"]
    config["add_bos_token"] = True
    path.write_text(json.dumps(config))
    with pytest.raises(LoadError, match=rf"{saved_folder}: add_bos_token is set but there is no bos_token"):
        Tokenizer.from_hf_folder(saved_folder)


def test_no_chat_template(saved_folder):
    path = saved_folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    del config["chat_template"]
    path.write_text(json.dumps(config))
    tokenizer = Tokenizer.from_hf_folder(saved_folder)
    with pytest.raises(ChatTemplateError, match=rf"{saved_folder}: this tokenizer has no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tokenizer.stop_token_ids == [tokenizer.eos_token_id]


def write_tokenizer_gguf(path: Path, model: str | None, tokens: list[str], **extra) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for key, value in extra.items():
        writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("bert", {}, r"tokenizer\.ggml\.model = 'bert' is not supported"),
    (None, {}, r"missing metadata key 'tokenizer\.ggml\.model'"),
    ("gpt2", {}, r"byte-level BPE \(tokenizer\.ggml\.model 'gpt2'\) without tokenizer\.ggml\.merges"),
    ("llama", {"tokenizer.ggml.eos_token_id": 9}, r"tokenizer\.ggml\.eos_token_id = 9 is outside the 3 tokens"),
])
def test_bad_gguf_tokenizer_metadata(tmp_path, model, extra, message):
    path = write_tokenizer_gguf(tmp_path / "bad.gguf", model, ["a", "b", "ab"], **extra)
    with pytest.raises(LoadError, match=rf"bad\.gguf: {message}"):
        Tokenizer.from_gguf(gguf.GGUFReader(path), path)
