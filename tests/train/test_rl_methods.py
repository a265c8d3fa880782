"""`velotune train` with method dpo, orpo and grpo on a tiny chat model: each writes a loadable
adapter and moves its objective the right way; bad rows and rewards fail by name."""
from __future__ import annotations

import json

import pytest
from rich.console import Console

import velotune
from tests.cli.cli_helpers import make_chat_model
from velotune.data.files import DataError
from velotune.rl.rewards import RewardError
from velotune.train.config import TrainConfig
from velotune.train.run import train_from_config

PAIRS = [{"prompt": "Say yes", "chosen": "yes", "rejected": "no way"},
         {"prompt": "Greet me", "chosen": "hello", "rejected": "go away"},
         {"prompt": "Colour of grass?", "chosen": "green", "rejected": "purple"}]


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"))


def short_reward(prompts, completions, **_):
    """Shorter completions are better (the stop token comes sooner)."""
    return [-float(len(c)) for c in completions]


def failing_reward(prompts, completions, **_):
    raise ValueError("no answer column")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, method, data, **values) -> TrainConfig:
    settings = dict(model=str(make_chat_model(tmp_path / "model")), dataset=str(data), method=method,
                    output_dir=str(tmp_path / "run"), micro_batch_size=3, learning_rate=2e-2,
                    max_seq_length=64, lora_r=4, lora_alpha=8, seed=0)
    return TrainConfig(**{**settings, **values})


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto", "simpo"])
def test_preference_methods_lower_their_loss(tmp_path, method):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = train_from_config(config(tmp_path, method, data, max_steps=12, beta=0.5, eval_split=0.0),
                               console=quiet())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < losses[0]
    model, _ = velotune.load_model(result.output)
    assert model.lora_config.r == 4


def test_grpo_runs_with_a_named_reward(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say something"}, {"prompt": "Count"}])
    cfg = config(tmp_path, "grpo", data, max_steps=3, micro_batch_size=6, num_generations=3, eval_split=0.0,
                 max_completion_length=6, rewards=["tests.train.test_rl_methods:short_reward"])
    result = train_from_config(cfg, console=quiet())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all("reward" in r for r in records)
    assert (result.output / "adapter_model.safetensors").exists()


def test_missing_rejected_names_the_line(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:1] + [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl line 2: missing field 'rejected'"):
        train_from_config(config(tmp_path, "dpo", data, max_steps=1), console=quiet())


def test_reward_that_raises_is_named(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say something"}])
    cfg = config(tmp_path, "grpo", data, max_steps=1, micro_batch_size=2, num_generations=2, eval_split=0.0,
                 max_completion_length=4, rewards=["tests.train.test_rl_methods:failing_reward"])
    with pytest.raises(RewardError, match="failing_reward raised ValueError: no answer column"):
        train_from_config(cfg, console=quiet())


def test_grpo_arithmetic_example_config_and_rewards(tmp_path, monkeypatch):
    from pathlib import Path

    from velotune.rl.rewards import resolve
    from velotune.train.config import check_values

    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "examples"))
    import grpo_arithmetic

    problems = grpo_arithmetic.write_problems(tmp_path / "p.jsonl", 5, seed=1)
    check_values(grpo_arithmetic.config(tmp_path / "run", 3, problems), "example")
    fns = [resolve(name) for name in grpo_arithmetic.REWARDS]
    row = json.loads(problems.read_text().splitlines()[0])
    right = f"So it is {row['answer']}. Answer: {row['answer']}"
    assert [fn([row["prompt"]], [right], answer=[row["answer"]])[0] for fn in fns] == [1.0, 0.5]
