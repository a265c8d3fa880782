"""The loop guard (train/guard.py): a poisoned row stops the run before the update, naming the row
and keeping the last good state; `on_nonfinite: skip` steps over it; a non-finite learning rate
stops at once; a too-high learning rate is reported as diverging; the guard adds no GPU->host
read to a step."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from tests.train.train_helpers import load_tiny, make_examples

from velotune.data import Example
from velotune.train.checkpoint import WEIGHTS_FILE, list_checkpoints
from velotune.train.config import TrainConfig
from velotune.train.guard import MAX_SKIPPED_IN_A_ROW, LoopGuard, NonFiniteStep
from velotune.train.trainer import Trainer

POISON = 1          # the BOS id: make_examples never uses it, so only the poisoned row holds it


def poisoned_data(n: int = 12) -> list[Example]:
    examples = make_examples(n, seed=2)
    ids = list(examples[5].input_ids)
    ids[1] = POISON
    examples[5] = Example(ids, examples[5].labels, "train.jsonl line 6")
    return examples


def poisoned_model(folder):
    """Qwen2 (untied head): a NaN embedding row makes the loss NaN only for rows holding the id."""
    model = load_tiny(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = math.nan
    return model


def config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(method="full", output_dir=str(tmp_path / "run"), max_steps=6, micro_batch_size=2,
                    learning_rate=1e-3, save_steps=2, seed=0)
    return TrainConfig(**{**settings, **overrides})


def finite(model) -> bool:
    return all(torch.isfinite(p).all() for name, p in model.named_parameters() if "embed_tokens" not in name)


def test_a_poisoned_row_stops_the_run_naming_it_and_keeping_the_last_good_state(tiny_model_dir, tmp_path):
    model = poisoned_model(tiny_model_dir("qwen2"))
    trainer = Trainer(model, config(tmp_path), poisoned_data(), show_progress=False)
    with pytest.raises(NonFiniteStep) as info:
        trainer.train()
    message = str(info.value)
    step = trainer.state.step + 1
    assert message.startswith(f"step {step}: non-finite loss and gradient norm (loss nan, grad norm nan")
    assert "the update was not applied" in message
    assert "rows whose own loss is not finite: train.jsonl line 6" in message
    assert finite(model)                                     # the NaN never reached a trained weight
    kept = list_checkpoints(tmp_path / "run")[-1]
    assert kept.name == f"step-{step - 1}" and f"is in {kept}" in message and f"--resume={kept}" in message
    saved = load_file(str(kept / WEIGHTS_FILE))
    assert all(torch.isfinite(t).all() for name, t in saved.items() if "embed_tokens" not in name)


def test_skip_steps_over_the_poisoned_row_and_trains_on(tiny_model_dir, tmp_path, capsys):
    model = poisoned_model(tiny_model_dir("qwen2"))
    trainer = Trainer(model, config(tmp_path, on_nonfinite="skip"), poisoned_data(), show_progress=False)
    result = trainer.train()
    assert result.steps == 6 and sum(math.isnan(x) for x in result.losses) == 1   # one epoch: drawn once
    assert all(math.isfinite(x) for x in result.losses if not math.isnan(x))
    assert finite(model)
    assert "update skipped (on_nonfinite: skip); rows: " in capsys.readouterr().err


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_a_nonfinite_learning_rate_stops_the_run(tiny_model_dir, tmp_path, action):
    trainer = Trainer(load_tiny(tiny_model_dir("qwen2")), config(tmp_path, on_nonfinite=action, max_steps=8),
                      make_examples(16), show_progress=False)
    scheduler = trainer.scheduler                            # as a broken schedule would give it
    scheduler.base_lrs = scheduler._last_lr = [math.inf] * len(scheduler.base_lrs)
    with pytest.raises(NonFiniteStep) as info:
        trainer.train()
    in_a_row = MAX_SKIPPED_IN_A_ROW if action == "skip" else 1
    assert trainer.state.step == in_a_row - 1
    assert "non-finite learning rate" in str(info.value) and "lr inf" in str(info.value)
    if action == "stop":
        assert str(info.value).endswith("Nothing was trained yet; no checkpoint was written")
    else:
        assert f"({MAX_SKIPPED_IN_A_ROW} steps in a row)" in str(info.value)


def test_a_learning_rate_far_too_high_is_reported(tiny_model_dir, tmp_path):
    """2e4 (a typo for 2e-4) breaks the weights within two steps: the run stops before they are
    written; 1.0 diverges without NaN: a warning names the learning rate; 0.1 does not warn."""
    examples = make_examples(40, seed=1)
    folder = tiny_model_dir("qwen2")
    typo = Trainer(load_tiny(folder), config(tmp_path, learning_rate=2e4, max_steps=30), examples,
                   show_progress=False)
    with pytest.raises(NonFiniteStep, match="lower key 'learning_rate'"):
        typo.train()
    warnings = {}
    for lr in (1.0, 0.1):
        trainer = Trainer(load_tiny(folder), config(tmp_path / str(lr), learning_rate=lr, max_steps=30,
                                                    lr_scheduler="constant", save_steps=0),
                          examples, show_progress=False)
        trainer.train()
        warnings[lr] = trainer.guard.warnings
    assert len(warnings[1.0]) == 1 and warnings[0.1] == []
    assert "the training loss is diverging" in warnings[1.0][0] and "key 'learning_rate' (1 now)" in warnings[1.0][0]


def test_eval_divergence_and_nan_are_reported_once():
    said = []
    guard = LoopGuard(divergence_ratio=2.0, say=said.append)
    for step, loss in ((0, 2.0), (10, 1.5), (20, 2.9), (30, 3.2), (40, 10.8)):
        guard.observe_eval(step, loss)
    assert guard.warnings == ["step 30: eval loss 3.2000 is 2.1x its best, 1.5000: the run is diverging "
                              "(key 'learning_rate' too high?) or overfitting"]
    quiet = LoopGuard(divergence_ratio=0)
    quiet.observe_eval(0, 2.0)
    quiet.observe_eval(1, 50.0)
    quiet.observe_eval(2, math.nan)
    assert quiet.warnings == ["step 2: eval loss is nan: the weights are no longer finite"]


def test_the_guard_reads_nothing_more_from_the_device(tiny_model_dir, tmp_path, monkeypatch):
    """A step with the guard reads as many tensors to the host as one whose guard admits blindly."""
    reads = {"n": 0}
    for name in ("item", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            reads["n"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for blind in (False, True):
        trainer = Trainer(load_tiny(tiny_model_dir("qwen2")), config(tmp_path / str(blind), gradient_accumulation_steps=3),
                          make_examples(12), show_progress=False)
        if blind:
            trainer.guard.admit = lambda *args: True
        stream = trainer.batches.iterate()
        micro = [next(stream)[2] for _ in range(3)]
        reads["n"] = 0
        trainer.optimizer_step(micro)
        counts.append(reads["n"])
    assert counts[0] == counts[1]


def test_a_padding_free_batch_is_split_into_its_documents_by_name():
    """On a GPU micro-batches are padding-free: the guard's per-row forwards take each document
    of the one long row, named by its own `where`."""
    from velotune.data import Example
    from velotune.train.data import MicroBatches
    from velotune.train.guard import row_of

    examples = [Example([5, 6, 7], [5, 6, 7], "a.jsonl line 1"), Example([8, 9], [8, 9], "a.jsonl line 2")]
    batches = MicroBatches(examples, 2, pad_id=0, seed=0, flat=True, bucketed=True, max_seq_length=8)
    batch = batches.collate([0, 1])
    assert sorted(batch["where"]) == ["a.jsonl line 1", "a.jsonl line 2"] and batch["input_ids"].shape == (1, 256)
    for i, name in enumerate(batch["where"]):
        row = row_of(batch, i)
        example = examples[int(name[-1]) - 1]
        assert row["input_ids"].tolist() == [example.input_ids]
        assert row["position_ids"].tolist() == [list(range(len(example)))]
