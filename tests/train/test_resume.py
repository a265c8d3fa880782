"""Checkpoints: a run resumed from step 7 of 15 continues exactly as the uninterrupted run, and
a failure while a checkpoint is being written leaves only complete checkpoints behind."""
from __future__ import annotations

import pytest
import torch
from tests.train.train_helpers import load_tiny, make_examples

from velotune.lora.config import LoraConfig
from velotune.lora.model import apply_lora
from velotune.train import checkpoint as ckpt
from velotune.train.config import TrainConfig
from velotune.train.trainer import Trainer


def config_for(tmp_path, name: str, **overrides) -> TrainConfig:
    settings = dict(method="full", output_dir=str(tmp_path / name), max_steps=15, save_steps=7,
                    micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=3e-3,
                    lr_scheduler="cosine", warmup_steps=3, weight_decay=0.01, seed=5)
    return TrainConfig(**{**settings, **overrides})


def model_for(folder, method: str):
    model = load_tiny(folder)
    if method == "lora":      # with dropout, so the restored RNG state matters
        torch.manual_seed(0)
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.2, init=False), dtype=torch.float32)
    return model


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resumed_run_equals_uninterrupted_run(tiny_model_dir, tmp_path, method):
    folder = tiny_model_dir("llama")
    examples = make_examples(10, seed=3)          # 5 micro-batches an epoch: steps cross epochs
    full = Trainer(model_for(folder, method), config_for(tmp_path, "a", method=method), examples,
                   show_progress=False)
    whole = full.train()
    assert len(whole.losses) == 15

    resumed = Trainer(model_for(folder, method), config_for(tmp_path, "b", method=method), examples,
                      show_progress=False)
    resumed.resume_from(tmp_path / "a" / "checkpoints" / "step-7")
    assert (resumed.state.step, resumed.state.epoch, resumed.state.batch_index) == (7, 2, 4)
    rest = resumed.train()
    assert rest.losses == whole.losses[7:]
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    # A fresh start differs, so the equality above is not vacuous.
    assert whole.losses[7] != whole.losses[0]


def test_failure_while_writing_leaves_only_complete_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    examples = make_examples(8, seed=4)
    config = config_for(tmp_path, "run", max_steps=6, save_steps=2, save_total_limit=0)
    trainer = Trainer(load_tiny(tiny_model_dir("qwen2")), config, examples, show_progress=False)
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if "step-6" in str(path) and str(path).endswith("scheduler.pt"):
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    root = tmp_path / "run" / "checkpoints"
    assert any("step-6" in str(p) for p in calls)              # it did die inside step 6's write
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-2", "step-4"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-4"]
    for folder in ckpt.list_checkpoints(tmp_path / "run"):
        assert all((folder / name).is_file() for name in ckpt.FILES)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-4"

    # A hard kill cannot clean up: its temporary folder is removed by the next run, which
    # resumes from `latest` and finishes.
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    (root / ".tmp-step-6-999").mkdir()
    (root / ".tmp-step-6-999" / "state.json").write_text("{")
    again = Trainer(load_tiny(tiny_model_dir("qwen2")), config, examples, show_progress=False)
    again.resume_from(ckpt.resolve_resume(True, tmp_path / "run"))
    assert again.state.step == 4
    assert len(again.train().losses) == 2
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-4", "step-6"]
