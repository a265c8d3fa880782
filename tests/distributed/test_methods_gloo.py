"""The preference and RL methods, and QLoRA, on 2 CPU processes (gloo, DDP over the adapters)
against 1 process with twice the micro-batch (lora and full: test_trainer_gloo.py): the same losses, method metrics, eval metrics and adapters, since the
step's divisor (pairs, examples, completions), KTO's reference point and GRPO's completions
(sampled from per-prompt seeds, grouped on the rank of their prompt) do not depend on the ranks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.cli_helpers import make_chat_model
from tests.distributed.gloo_helpers import quiet, run_on_ranks, train_job, write_chat_data
from velotune.train.config import TrainConfig
from velotune.train.metrics import read_metrics
from velotune.train.run import train_from_config

pytest.importorskip("transformers")

# 10 rows, 2 held out: 8 training pairs (16 KTO examples, 8 GRPO prompts) fill global micro-batches
# of 4 units exactly, so no rank drops a row (velotune.distributed.sharding) and both runs see the
# same units in the same steps.
PAIRS = [{"prompt": f"Question {i}: say {w}", "chosen": w, "rejected": f"not {w}, no"}
         for i, w in enumerate("yes hello green four blue seven ok fine ten up".split())]


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def config(tmp_path, method: str, name: str, micro_batch: int) -> TrainConfig:
    model = tmp_path / "model"
    if not model.exists():
        make_chat_model(model)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    if method == "qlora":     # 10 conversations, 8 trained: 2 global micro-batches of 4
        data, extra = write_chat_data(tmp_path / "chat.jsonl", 10), {"dataset_format": "messages"}
    elif method == "grpo":
        extra = {"rewards": ["tests.distributed.test_methods_gloo:length_reward"], "num_generations": 3,
                 "max_completion_length": 5}
    else:
        extra = {"beta": 0.5}
    return TrainConfig(model=str(model), dataset=str(data), method=method, output_dir=str(tmp_path / name),
                       max_steps=3, micro_batch_size=micro_batch, gradient_accumulation_steps=2, learning_rate=2e-2,
                       max_seq_length=64, lora_r=4, lora_alpha=8, eval_split=0.2, eval_steps=2, report=False,
                       device="cpu", seed=2, **extra)


def records(folder) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_gib", "elapsed_s", "train_seconds",
                                                          "data_seconds")}
            for r in read_metrics(folder)]


def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(tmp_path):
    # grpo: 3 completions x 2 micro-batches = 2 prompts per rank and step
    methods = {"dpo": 2, "orpo": 2, "kto": 2, "simpo": 2, "grpo": 3, "qlora": 2}
    for method, b in methods.items():
        train_from_config(config(tmp_path, method, f"{method}-one", 2 * b), console=quiet(), show_progress=False)
    run_on_ranks(2, train_job, *(config(tmp_path, method, f"{method}-two", b) for method, b in methods.items()))
    for method in methods:
        one, two = records(tmp_path / f"{method}-one"), records(tmp_path / f"{method}-two")
        assert [sorted(r) for r in two] == [sorted(r) for r in one], method
        assert len([r for r in one if "loss" in r]) == 3 and any(k.startswith("eval_") for k in one[0])
        for got, want in zip(two, one):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (method, got["step"], key)
        losses = [r["loss"] for r in one if "loss" in r]
        assert losses[0] != losses[-1]
        a = load_file(tmp_path / f"{method}-one" / "adapter" / "adapter_model.safetensors")
        b_ = load_file(tmp_path / f"{method}-two" / "adapter" / "adapter_model.safetensors")
        for name in a:   # Adam divides by the gradients' root mean square: float32 summation-order noise of
            # the two runs' gradients (1e-7) becomes ~1e-5 of a small B after three steps at lr 2e-2
            assert float((a[name] - b_[name]).norm() / a[name].norm().clamp(min=1e-12)) <= 1e-4, (method, name)
    assert torch.get_default_dtype() == torch.float32
