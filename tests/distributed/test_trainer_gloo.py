"""The real trainer on 2 CPU processes (gloo) against 1 process seeing the same global batches:
LoRA through DDP and full fine-tuning through FSDP2 give the same losses, eval losses and
results; FSDP's sharded checkpoints resume on a different number of ranks; only rank 0 writes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests.cli.cli_helpers import make_chat_model, train_losses
from tests.distributed.gloo_helpers import eval_losses, quiet, run_on_ranks, train_job, write_chat_data

from velotune.train import checkpoint as ckpt
from velotune.train.config import TrainConfig
from velotune.train.run import train_from_config

pytest.importorskip("transformers")

STEPS = 4


def config(tmp_path, name: str, **values) -> TrainConfig:
    """40 conversations, 8 held out: 32 training rows = 4 global micro-batches of 8 per epoch,
    so no row is dropped and 2 ranks x 4 rows see exactly what 1 rank x 8 rows sees."""
    model = tmp_path / "model"
    if not model.exists():
        make_chat_model(model)
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_chat_data(data, 40)
    settings = dict(model=str(model), dataset=str(data), dataset_format="messages", eval_split=0.2,
                    output_dir=str(tmp_path / name), max_steps=STEPS, gradient_accumulation_steps=2,
                    max_seq_length=96, warmup_steps=1, seed=3, device="cpu", report=False)
    return TrainConfig(**{**settings, **values})


def assert_close_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=1e-5)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 summation order: relative error of each tensor's norm within 1e-5
    (Adam turns 1e-7 gradient differences into ~1e-6 absolute weight differences)."""
    assert a.keys() == b.keys() and a
    for name in a:
        err = float((a[name] - b[name]).norm() / b[name].norm())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_lora_on_two_ranks_equals_one_rank_with_twice_the_micro_batch(tmp_path):
    one = config(tmp_path, "one", method="lora", micro_batch_size=4, learning_rate=2e-2, eval_steps=2)
    train_from_config(one, console=quiet(), show_progress=False)
    two = config(tmp_path, "two", method="lora", micro_batch_size=2, learning_rate=2e-2, eval_steps=2)
    run_on_ranks(2, train_job, two)

    assert_close_losses(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"))
    single_evals = eval_losses(tmp_path / "one")
    assert sorted(single_evals) == [0, 2, 4]
    assert eval_losses(tmp_path / "two") == pytest.approx(single_evals, rel=1e-5)
    adapter = "adapter/adapter_model.safetensors"
    assert_same_tensors(load_file(tmp_path / "two" / adapter), load_file(tmp_path / "one" / adapter))
    # Training moved the adapters, so the equality above is not that of two untouched inits.
    assert train_losses(tmp_path / "one")[-1] < train_losses(tmp_path / "one")[0]
    # Rank 0 alone wrote: one metrics line per step (plus one per eval), one adapter.
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + 3


def test_fsdp_full_fine_tune_on_two_ranks_equals_one_rank_and_resumes_across_world_sizes(tmp_path):
    common = dict(method="full", learning_rate=3e-3, save_steps=2, weight_decay=0.01)
    one = config(tmp_path, "one", micro_batch_size=4, **common)
    train_from_config(one, console=quiet(), show_progress=False)
    two = config(tmp_path, "two", micro_batch_size=2, **common)
    # On the same two ranks afterwards: resume the one-process checkpoint of step 2 (single-file
    # format) under FSDP.
    two_from_one = config(tmp_path, "two-from-one", micro_batch_size=2,
                          resume=str(tmp_path / "one" / "checkpoints" / "step-2"), **common)
    run_on_ranks(2, train_job, two, two_from_one)

    want = train_losses(tmp_path / "one")
    assert_close_losses(train_losses(tmp_path / "two"), want)
    assert want[-1] < want[0]
    assert_same_tensors(load_file(tmp_path / "two" / "model" / "model.safetensors"),
                        load_file(tmp_path / "one" / "model" / "model.safetensors"))
    assert eval_losses(tmp_path / "two") == pytest.approx(eval_losses(tmp_path / "one"), rel=1e-5)

    sharded = tmp_path / "two" / "checkpoints" / "step-2"
    assert (sharded / ckpt.SHARDED_DIR / ".metadata").is_file()
    assert not (sharded / ckpt.WEIGHTS_FILE).exists()
    assert sorted(p.name for p in (sharded / ckpt.SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # The checkpoint written by 2 ranks, resumed by 1 process with the same global micro-batch.
    resumed = config(tmp_path, "one-from-two", micro_batch_size=4, resume=str(sharded), **common)
    train_from_config(resumed, console=quiet(), show_progress=False)
    assert train_losses(tmp_path / "one-from-two") == pytest.approx(want[2:], rel=1e-5)   # steps 3 and 4
    assert train_losses(tmp_path / "two-from-one") == pytest.approx(want[2:], rel=1e-5)
    assert_same_tensors(load_file(tmp_path / "one-from-two" / "model" / "model.safetensors"),
                        load_file(tmp_path / "one" / "model" / "model.safetensors"))


def test_resume_with_another_global_micro_batch_is_refused(tmp_path):
    first = config(tmp_path, "first", method="lora", micro_batch_size=4, max_steps=2, save_steps=2,
                   eval_split=0.0)
    train_from_config(first, console=quiet(), show_progress=False)
    other = config(tmp_path, "other", method="lora", micro_batch_size=2, eval_split=0.0,
                   resume=str(tmp_path / "first"), resume_allow_changes=["max_steps"])   # past the config check
    with pytest.raises(ckpt.CheckpointError, match=r"global micro-batch of 4 rows .* 2 x 1 = 2"):
        train_from_config(other, console=quiet(), show_progress=False)
