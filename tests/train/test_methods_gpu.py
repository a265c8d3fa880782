"""On a GPU, through the trainer: CUDA graphs for qlora and full give eager's losses; modules trained
in full beside LoRA run under bf16 autocast (float32 master weights through the Triton loss);
DPO and GRPO train with checkpointing and offloaded checkpoints."""
from __future__ import annotations

import pytest
import torch

import velotune
from tests.train.test_method_accumulation import grpo_objective
from tests.train.train_helpers import make_examples, save_tiny
from velotune.rl.grpo import PromptExample
from velotune.rl.preference import PreferenceExample
from velotune.train import methods
from velotune.train.config import TrainConfig
from velotune.train.trainer import Trainer

pytestmark = pytest.mark.gpu


def losses(folder, tmp_path, method: str, **values) -> tuple[list[float], Trainer]:
    config = TrainConfig(method=method, output_dir=str(tmp_path / f"{method}-{values}"), max_steps=4,
                         micro_batch_size=2, packing=True, max_seq_length=48, learning_rate=1e-3, device="cuda",
                         **({} if method == "full" else {"lora_r": 4}), **values)
    model, _ = velotune.load_model(folder, device="cuda", dtype=methods.load_dtype(config, torch.device("cuda")),
                                   **methods.load_options(config))
    torch.manual_seed(0)
    trainer = Trainer(methods.prepare(model, config), config, make_examples(24, seed=2), show_progress=False)
    return trainer.train().losses, trainer


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_cuda_graphs_give_eager_losses(tmp_path, method):
    save_tiny("qwen2", tmp_path / "tiny")
    eager, _ = losses(tmp_path / "tiny", tmp_path, method, cuda_graphs=False)
    graphed, trainer = losses(tmp_path / "tiny", tmp_path, method, cuda_graphs=True)
    assert trainer.graphed is not None and trainer.graphed.replays >= 2, trainer.graphed.describe()
    for a, b in zip(graphed, eager):
        assert abs(a - b) <= 2e-3 * abs(b), (graphed, eager)


def test_trainable_modules_under_autocast(tmp_path):
    """(Four steps on four different batches of random tokens need not lower the loss, as the
    first run of this test on an H100 showed: what is checked is that the float32 modules train.)"""
    save_tiny("qwen2", tmp_path / "tiny")
    start, _ = velotune.load_model(tmp_path / "tiny", device="cpu", dtype=torch.float32)
    got, trainer = losses(tmp_path / "tiny", tmp_path, "lora", trainable_modules=["embed_tokens", "lm_head"],
                          trainable_modules_lr=1e-2, cuda_graphs=False)
    assert all(torch.isfinite(torch.tensor(got)))
    model = trainer.model
    assert model.lm_head.weight.dtype == torch.float32 and trainer.amp_dtype == torch.bfloat16
    for name in ("lm_head", "model.embed_tokens"):
        before = start.get_submodule(name).weight
        after = model.get_submodule(name).weight.detach().float().cpu()
        assert torch.isfinite(after).all() and not torch.equal(after, before), name


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_preference_and_rl_with_offloaded_checkpoints(tmp_path, method):
    save_tiny("qwen2", tmp_path / "tiny")
    config = TrainConfig(method=method, output_dir=str(tmp_path / "run"), max_steps=3, micro_batch_size=4,
                         gradient_checkpointing=True, offload_checkpoints=True, lora_r=4, device="cuda",
                         max_seq_length=64, learning_rate=1e-2,
                         **({"rewards": ["m:f"], "num_generations": 4, "max_completion_length": 6}
                            if method == "grpo" else {}))
    model, _ = velotune.load_model(tmp_path / "tiny", device="cuda")
    methods.prepare(model, config)
    units, objective = [PreferenceExample(e.input_ids[:4], e.input_ids[4:], e.input_ids[4:][::-1], e.where)
                        for e in make_examples(8, seed=6, min_len=7)], None
    if method == "grpo":
        units, objective = [PromptExample([5, 9, 13, 7], {"prompt": "a"}, 0)], grpo_objective(4, "grpo", "token")
    trainer = Trainer(model, config, units, objective=objective, show_progress=False)
    got = trainer.train().losses
    assert len(got) == 3 and all(torch.isfinite(torch.tensor(got)))
    assert model.offload_stats.offloaded > 0         # the last training forward parked its layer inputs
