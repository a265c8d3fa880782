"""Exact accumulation for every method: the trainer's step over 4 micro-batches of 2 units gives the
loss and gradients of one micro-batch of 8 (float32, CPU, within 1e-5), pairs, KTO examples and
GRPO completions alike, including GRPO's four normalisations, GSPO's sequence ratios and KTO's
reference point, which are measured over the whole step."""
from __future__ import annotations

import random

import pytest
import torch

from tests.cli.cli_helpers import byte_tokenizer
from velotune.lora import LoraConfig, apply_lora
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.rl.grpo import GRPOObjective, PromptExample
from velotune.rl.kto import KTOExample
from velotune.rl.preference import PreferenceExample
from velotune.train.config import TrainConfig
from velotune.train.trainer import Trainer

VOCAB = 259     # the byte tokenizer of tests/cli/cli_helpers.py


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=2)
    # init=False: B is random, so the policy differs from the adapter-free reference from the start
    return apply_lora(Transformer(cfg), LoraConfig(r=4, alpha=8, init=False), dtype=torch.float32)


def ids(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))]


def pairs(n: int = 8) -> list[PreferenceExample]:
    rng = random.Random(0)
    return [PreferenceExample(ids(rng, 2, 6), ids(rng, 1, 7), ids(rng, 1, 9), f"pair {i}") for i in range(n)]


def kto_examples(n: int = 8) -> list[KTOExample]:
    rng = random.Random(1)
    out = [KTOExample(ids(rng, 2, 6), ids(rng, 1, 8), i % 3 != 0, f"row {i}") for i in range(n)]
    for i, e in enumerate(out):
        e.kl_completion_ids = out[(i + 1) % n].completion_ids
    return out


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def grpo_objective(micro_batch: int, loss_type: str, sampling: str, generation_batch: int = 0) -> GRPOObjective:
    return GRPOObjective(byte_tokenizer(), [length_reward], num_generations=4, max_completion_length=6,
                         temperature=1.0, beta=0.1, loss_type=loss_type, importance_sampling=sampling, seed=3,
                         micro_batch_size=micro_batch, generation_batch_size=generation_batch)


def step(model, tmp_path, method: str, units, micro_batch: int, accumulation: int, objective=None, **settings):
    """(loss, gradients) of one optimizer step's accumulation; the objective comes from the config
    unless given (GRPO's needs a tokenizer)."""
    config = TrainConfig(method=method, output_dir=str(tmp_path / f"run{micro_batch}"), micro_batch_size=micro_batch,
                         gradient_accumulation_steps=accumulation, lora_r=4, lora_alpha=8, device="cpu",
                         **({"rewards": ["unused:reward"], "num_generations": 4, "max_completion_length": 6,
                             "max_seq_length": 64} if method == "grpo" else {"beta": 0.3}), **settings)
    trainer = Trainer(model, config, units, objective=objective, show_progress=False)
    per_draw = len(units) // trainer.draws_per_step
    drawn = [units[i * per_draw:(i + 1) * per_draw] for i in range(trainer.draws_per_step)]
    micro = trainer.objective.micro_batches(trainer, drawn, 5)
    assert len(micro) == accumulation
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.accumulate(micro)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(split, whole) -> None:
    assert split[0] == pytest.approx(whole[0], rel=1e-6, abs=1e-7)
    assert split[1].keys() == whole[1].keys() and len(whole[1]) == 2 * 7 * 2   # A and B of 7 projections, 2 layers
    for name, grad in whole[1].items():
        assert grad.norm() > 0, name
        err = float((split[1][name] - grad).norm() / grad.norm())
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("method, settings", [("dpo", {}), ("dpo", {"dpo_loss": "ipo"}), ("orpo", {}),
                                              ("simpo", {"simpo_gamma": 0.8})])
def test_pair_methods(tmp_path, method, settings):
    model, units = tiny_model(), pairs()
    whole = step(model, tmp_path, method, units, 8, 1, **settings)
    assert_same(step(model, tmp_path, method, units, 2, 4, **settings), whole)


def test_kto_with_its_reference_point(tmp_path):
    model, units = tiny_model(), kto_examples()
    assert_same(step(model, tmp_path, "kto", units, 2, 4), step(model, tmp_path, "kto", units, 8, 1))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("sampling", ["token", "sequence"])
def test_grpo_loss_types(tmp_path, loss_type, sampling):
    model = tiny_model()
    prompts = [PromptExample([5, 9, 13, 7], {"prompt": "a"}, 0), PromptExample([3, 30, 8], {"prompt": "b"}, 1)]
    whole = step(model, tmp_path, "grpo", prompts, 8, 1, grpo_objective(8, loss_type, sampling))
    split = step(model, tmp_path, "grpo", prompts, 2, 4, grpo_objective(2, loss_type, sampling))
    assert_same(split, whole)


def test_grpo_completions_decoded_in_smaller_batches_are_the_same(tmp_path):
    """generation_batch_size 3 (a KV cache of 3 rows; 8 completions in batches of 3, 3, 2): the
    same completions, rewards, loss and gradients as decoding all 8 at once."""
    model = tiny_model()
    prompts = [PromptExample([5, 9, 13, 7], {"prompt": "a"}, 0), PromptExample([3, 30, 8], {"prompt": "b"}, 1)]
    whole = step(model, tmp_path, "grpo", prompts, 8, 1, grpo_objective(8, "grpo", "token"))
    batched = step(model, tmp_path, "grpo", prompts, 8, 1, grpo_objective(8, "grpo", "token", generation_batch=3))
    assert_same(batched, whole)
