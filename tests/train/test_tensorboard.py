"""`report_to: [tensorboard]`: the event files a run writes are read back with TensorBoard's own
reader (tensorboard's EventAccumulator): every logged number at its step, the config as text, the
held-out answers before and after; an unknown destination or a missing package fails before any
work."""
from __future__ import annotations

import json

import pytest
import torch
from tests.cli.cli_helpers import make_chat_model, write_config

from velotune.cli import main
from velotune.train.config import TrainConfigError, load_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="report_to tensorboard needs the tensorboard package (make install)")
from tensorboard.util import tensor_util  # noqa: E402


def read_back(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0,
                                                                          event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def text_of(acc, tag):
    events = acc.Tensors(tag)
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in events]


def test_a_run_writes_events_tensorboard_reads(tmp_path):
    model = make_chat_model(tmp_path / "model")
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model=str(model), dataset="chatterbot:ai,greetings",
                          eval_split=0.2, output_dir=str(run), max_steps=6, micro_batch_size=4, learning_rate=1e-2,
                          max_seq_length=128, sample_prompts=2, eval_steps=3, report_to=["tensorboard"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(config), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = read_back(run / "tensorboard")
    tags = acc.Tags()
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib", "eval_loss"):
        assert name in tags["scalars"], name
        expected = [(r["step"], r[name]) for r in records if name in r]
        assert [(e.step, e.value) for e in acc.Scalars(name)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("eval_loss")] == [0, 3, 6]

    (config_step, config_text), = text_of(acc, "config/text_summary")
    assert config_step == 0 and "report_to:" in config_text and "max_steps: 6" in config_text
    (samples_step, samples_text), = text_of(acc, "samples/text_summary")
    samples = json.loads((run / "samples.json").read_text())
    assert samples_step == 6 and len(samples) == 2
    for row in samples:
        assert " ".join(row["prompt"].split()) in samples_text
        assert row["before"] is not None
    assert samples_text.startswith("| prompt | before | after |")


def test_a_resumed_run_purges_the_interrupted_points(tmp_path):
    """The resumed writer carries purge_step: TensorBoard keeps one point per step."""
    from velotune.train.tensorboard import TensorBoardLog

    first = TensorBoardLog(tmp_path)
    for step in range(1, 6):
        first.scalars({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardLog(tmp_path, start_step=3)
    for step in range(4, 7):
        resumed.scalars({"step": step, "loss": 10.0 + step})
    resumed.close()
    points = [(e.step, e.value) for e in read_back(tmp_path / "tensorboard").Scalars("loss")]
    assert points == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]


def test_unknown_destination_gets_did_you_mean(tmp_path):
    with pytest.raises(TrainConfigError, match=r"command line.*report_to.*'tensorbord'.*did you mean tensorboard"):
        load_config(None, ["--report_to=[tensorbord]"])


def test_missing_package_fails_before_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TrainConfigError, match=r"report_to.*tensorboard package is not installed"):
        load_config(None, ["--report_to=[tensorboard]"])
