"""Reward checks."""
import pytest

from velotune.rl.rewards import RewardError, exact_numeric_answer, required_format, resolve, score


def test_exact_numeric_answer_reads_the_last_number():
    got = exact_numeric_answer(["q"] * 4, ["so 3 + 4 = 7", "answer: 1,250", "I think 8. No, 9.5", "none"],
                               answer=[7, 1250, 9.5, 1])
    assert got == [1.0, 1.0, 1.0, 0.0]


def test_required_format():
    fn = required_format(r"<answer>.*</answer>")
    assert fn([], ["<answer>4</answer>", "4"]) == [1.0, 0.0]


def test_reward_that_raises_is_named():
    def bad_reward(prompts, completions, **_):
        raise KeyError("answer")
    with pytest.raises(RewardError, match="bad_reward raised KeyError"):
        score(bad_reward, ["p"], ["c"], {})


def test_reward_of_wrong_length_is_named():
    def short_reward(prompts, completions, **_):
        return [1.0]
    with pytest.raises(RewardError, match="short_reward returned 1 values for 2 completions"):
        score(short_reward, ["p", "q"], ["c", "d"], {})


def test_resolve_module_function_and_errors():
    assert resolve("velotune.rl.rewards:exact_numeric_answer") is exact_numeric_answer
    with pytest.raises(RewardError, match="module:function"):
        resolve("no_colon")
    with pytest.raises(RewardError, match="no function 'nope'"):
        resolve("velotune.rl.rewards:nope")
