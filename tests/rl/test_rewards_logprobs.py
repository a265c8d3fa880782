"""Reward checks and chunked log-probs."""
import pytest
import torch

from velotune.rl.logprobs import token_logps
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


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_token_logps_match_full_log_softmax(softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,), generator=g)
    got = token_logps(hidden, weight, targets, softcap=softcap, chunk_size=8)
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-10)
    gh, gw = torch.autograd.grad(got.sum(), (hidden, weight))
    wh, ww = torch.autograd.grad(want.sum(), (hidden, weight))
    assert torch.allclose(gh, wh, atol=1e-10) and torch.allclose(gw, ww, atol=1e-10)
