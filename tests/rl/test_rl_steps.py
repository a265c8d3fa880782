"""DPO/ORPO and GRPO steps on a tiny random model with the real SmolLM2 tokenizer."""
import math

import pytest
import torch

from velotune.data.files import read_rows
from velotune.lora import LoraConfig, apply_lora, lora_parameters
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.rl.grpo import GRPOSettings, grpo_step
from velotune.rl.preference import tokenize_preferences
from velotune.rl.preference_step import pair_losses, preference_step


def tiny_lora_model(vocab: int, init=True):
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return apply_lora(Transformer(cfg), LoraConfig(r=4, alpha=8, init=init))


@pytest.fixture()
def pairs(smollm2_tokenizer):
    rows = read_rows([{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome, of course."},
                      {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                      {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Green."}])
    return tokenize_preferences(rows, smollm2_tokenizer, max_seq_length=64)


def test_dpo_starts_at_log2_with_identity_adapters(pairs, smollm2_tokenizer):
    model = tiny_lora_model(len(smollm2_tokenizer))
    losses = pair_losses(model, pairs, 0, "dpo", beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_accumulation_is_exact(pairs, smollm2_tokenizer, method):
    grads = []
    for micro in ([pairs], [pairs[:1], pairs[1:]]):
        model = tiny_lora_model(len(smollm2_tokenizer), init=False)
        params = lora_parameters(model)
        opt = torch.optim.SGD(params, lr=0.0)
        captured = []
        params[0].register_post_accumulate_grad_hook(lambda p: captured.append(p.grad.clone()))
        preference_step(model, micro, 0, opt, method, beta=0.1, max_grad_norm=1e9)
        grads.append(captured[-1])
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[1].norm()


def test_dpo_training_widens_the_margin(pairs, smollm2_tokenizer):
    model = tiny_lora_model(len(smollm2_tokenizer))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    first = preference_step(model, [pairs], 0, opt, "dpo", beta=0.5)
    for _ in range(15):
        last = preference_step(model, [pairs], 0, opt, "dpo", beta=0.5)
    assert first == pytest.approx(math.log(2), abs=1e-5)
    assert last < first - 0.1


def test_grpo_step_with_equal_rewards_has_no_policy_gradient(smollm2_tokenizer):
    model = tiny_lora_model(len(smollm2_tokenizer), init=False)
    params = lora_parameters(model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    settings = GRPOSettings(num_generations=3, max_completion_length=6, beta=0.0, micro_batch_size=2)
    result = grpo_step(model, smollm2_tokenizer, [{"prompt": "Say hi"}, {"prompt": "Count"}],
                       [lambda prompts, completions, **_: [1.0] * len(completions)], opt, settings)
    assert len(result.completions) == 6 and result.mean_reward == 1.0
    assert result.loss == pytest.approx(0.0, abs=1e-7)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params))


def test_grpo_step_moves_the_policy_and_passes_columns(smollm2_tokenizer):
    model = tiny_lora_model(len(smollm2_tokenizer), init=False)
    params = lora_parameters(model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    seen = {}

    def longer_is_better(prompts, completions, answer, **_):
        seen["answer"] = answer
        return [float(len(c)) for c in completions]

    settings = GRPOSettings(num_generations=4, max_completion_length=8, beta=0.04)
    result = grpo_step(model, smollm2_tokenizer, [{"prompt": "Tell me", "answer": 7}], [longer_is_better], opt, settings)
    assert seen["answer"] == [7] * 4
    assert len(set(result.rewards)) > 1
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, params))
