"""The chatterbot-corpus dialogues and their held-out split."""
import pytest

from velotune.data.chatterbot import held_out_split, load_chatterbot, read_corpus_file
from velotune.data.files import DataError


@pytest.fixture(scope="module")
def corpus():
    return load_chatterbot()


def test_corpus_loads_as_alternating_conversations(corpus):
    assert len(corpus) == 2025         # 2026 entries; one in trivia.yml is a lone string
    for sample in corpus:
        roles = [m["role"] for m in sample.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    first_ai = next(s for s in corpus if s.metadata["file"] == "ai")
    assert first_ai.messages[0] == {"role": "user", "content": "What is AI?"}
    assert first_ai.metadata["categories"] == ["AI", "artificial intelligence"]
    assert first_ai.where.endswith("ai.yml conversations[0]")


def test_category_filter(corpus):
    ai = load_chatterbot(categories=["ai"])
    assert 0 < len(ai) < len(corpus) and {s.metadata["file"] for s in ai} == {"ai"}


def test_yaml_scalars_stay_strings_and_unanswered_lines_drop(tmp_path):
    path = tmp_path / "mini.yml"
    path.write_text("categories:\n- mini\nconversations:\n- - Are you on?\n  - yes\n"
                    "  - Really?\n- - lonely question\n")
    [sample] = read_corpus_file(path)
    assert sample.messages == [{"role": "user", "content": "Are you on?"},
                               {"role": "assistant", "content": "yes"}]
    bad = tmp_path / "bad.yml"
    bad.write_text("conversations:\n- - [nested]\n")
    with pytest.raises(DataError, match=r"bad\.yml conversations\[0\]: expected a list of strings"):
        read_corpus_file(bad)


def test_held_out_split_is_deterministic_and_never_shares_a_question(corpus):
    train, held = held_out_split(corpus, 0.1, seed=0)
    assert len(train) + len(held) == len(corpus)
    assert abs(len(held) - 202) <= 10
    openings = {s.messages[0]["content"] for s in held}
    assert not openings & {s.messages[0]["content"] for s in train}
    assert held_out_split(corpus, 0.1, seed=0) == (train, held)
    assert held_out_split(corpus, 0.1, seed=1)[1] != held
