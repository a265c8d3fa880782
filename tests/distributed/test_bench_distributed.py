"""The single-process pieces of benchmarks/bench_distributed.py, on the CPU: the random model is
the same on every call (every rank builds the same one), the examples are what the script
promises, and the Trainer trains it through the helper the benchmark uses; and its equality part
(both methods, then the resume) on two gloo ranks, which must meet every barrier in order."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_distributed as bench  # noqa: E402

from velotune.data import IGNORE_INDEX  # noqa: E402
from velotune.distributed import World  # noqa: E402
from velotune.models.config import ModelConfig  # noqa: E402

TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def test_random_examples_have_the_promised_shape():
    rows = bench.random_examples(6, 100, 8, 12, seed=1)
    assert len(rows) == 6
    for row in rows:
        assert 8 <= len(row) <= 12 and max(row.input_ids) < 100
        prompt = len(row) // 4
        assert row.labels[:prompt] == [IGNORE_INDEX] * prompt and row.labels[prompt:] == row.input_ids[prompt:]
    assert bench.small_config().num_hidden_layers == 4


def test_every_rank_builds_the_same_random_model():
    torch.set_num_threads(1)
    for method in ("lora", "full"):
        a = bench.build_model(TINY, method, torch.device("cpu"), torch.float32)
        b = bench.build_model(TINY, method, torch.device("cpu"), torch.float32)
        pairs = list(zip(a.named_parameters(), b.named_parameters()))
        assert all(torch.equal(x, y) for (_, x), (_, y) in pairs)
        trainable = [name for name, p in a.named_parameters() if p.requires_grad]
        assert trainable and all(("lora_" in name) == (method == "lora") for name in trainable)


def test_train_losses_runs_the_trainer_and_the_tokens_per_s_reader(tmp_path):
    torch.set_num_threads(1)
    model = bench.build_model(TINY, "full", torch.device("cpu"), torch.float32)
    examples = bench.random_examples(8, TINY.vocab_size, 8, 16)
    config = bench.train_config(tmp_path / "run", "full", 2, 4, save_steps=2)
    losses, trainer = bench.train_losses(model, config, examples, World(), torch.device("cpu"))
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert bench.steady_tokens_per_s(tmp_path / "run", warmup=2) > 0
    assert abs(bench.max_relative([1.0, 2.02], [1.0, 2.0]) - 0.01) < 1e-12
    resumed, _ = bench.train_losses(bench.build_model(TINY, "full", torch.device("cpu"), torch.float32),
                                    bench.train_config(tmp_path / "again", "full", 2, 4), examples, World(),
                                    torch.device("cpu"), resume=tmp_path / "run" / "checkpoints" / "step-2")
    assert resumed == losses[2:]


def equal_job(folder: str) -> None:
    """`part_equal` with resume on the ranks of this group, on the tiny model, rows into `folder`."""
    import faulthandler

    import common

    from velotune import distributed

    faulthandler.dump_traceback_later(240, exit=True)   # a rank left waiting at a collective fails the test
    common.RESULTS = Path(folder) / "RESULTS.md"
    bench.small_config = lambda: TINY
    world = distributed.setup()
    bench.part_equal(world, Path(folder), micro_batch=1, steps=4, resume_check=True)
    faulthandler.cancel_dump_traceback_later()


def test_part_equal_on_two_cpu_ranks_meets_every_barrier(tmp_path):
    """Both methods in one run, then the resume on rank 0 alone: every rank meets each barrier in
    the same order (rank 1 once skipped one, which hung the lora-then-full run on 2 GPUs), and the
    rows say each equality and the resume hold."""
    from tests.distributed.gloo_helpers import run_on_ranks

    run_on_ranks(2, equal_job, str(tmp_path))
    rows = (tmp_path / "RESULTS.md").read_text()
    assert "| lora (DDP) | 2 | 1 | 4 |" in rows and "| full (FSDP2) | 2 | 1 | 4 |" in rows
    assert rows.count("| yes |") == 2
    against_writer = rows.split("against the run that wrote it")[1]
    assert float(against_writer.strip().splitlines()[-1].strip("| ").split(" | ")[-1]) < 1e-4
