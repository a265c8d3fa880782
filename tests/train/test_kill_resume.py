"""Checkpoints survive a hard kill for every method: a run killed with SIGKILL in the middle of
step 5 (its last checkpoint at step 4), then resumed, logs exactly the records of the run that was
never interrupted (losses, gradient norms, the method's metrics), for lora, qlora, full, dpo,
orpo, kto, simpo and grpo (whose completions are sampled again from the same per-step seeds and
reach the same rewards)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.cli_helpers import make_chat_model
from tests.distributed.gloo_helpers import quiet, write_chat_data
from velotune.train.config import METHODS, TrainConfig
from velotune.train.metrics import read_metrics
from velotune.train.run import train_from_config

ROOT = Path(__file__).resolve().parents[2]
KILLED_RUN = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from velotune.train.config import METHODS, TrainConfig
from velotune.train.run import train_from_config
from velotune.train.trainer import Trainer

config, kill_at = TrainConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
step = Trainer.optimizer_step

def step_or_die(self, micro_batches):
    if self.state.step == kill_at:      # the micro-batches are made (GRPO has sampled): die mid-step
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, micro_batches)

Trainer.optimizer_step = step_or_die
train_from_config(config, show_progress=False)
"""
PAIRS = [{"prompt": "Say yes", "chosen": "yes", "rejected": "no way"},
         {"prompt": "Greet me", "chosen": "hello", "rejected": "go away"},
         {"prompt": "Colour of grass?", "chosen": "green", "rejected": "purple"},
         {"prompt": "Two plus two?", "chosen": "four", "rejected": "five, maybe"}]


def short_reward(prompts, completions, **_):
    return [-float(len(c)) for c in completions]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_for(tmp_path: Path, method: str, name: str, **values) -> TrainConfig:
    model = tmp_path / "model"
    if not model.exists():
        make_chat_model(model)
    if method in ("lora", "qlora", "full"):
        data, extra = write_chat_data(tmp_path / "chat.jsonl", 12), {"dataset_format": "messages"}
    elif method == "grpo":
        data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
        extra = {"rewards": ["tests.train.test_kill_resume:short_reward"], "num_generations": 3,
                 "max_completion_length": 5, "temperature": 1.0}
    else:
        data, extra = write_jsonl(tmp_path / "pairs.jsonl", PAIRS), {"beta": 0.5}
    settings = dict(model=str(model), dataset=str(data), method=method, output_dir=str(tmp_path / name),
                    max_steps=6, save_steps=2, micro_batch_size=3 if method == "grpo" else 2,
                    learning_rate=1e-3 if method == "full" else 2e-2,
                    gradient_accumulation_steps=2, max_seq_length=64, eval_split=0.0,
                    report=False, device="cpu", seed=4, **extra,
                    **({} if method == "full" else {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1}))
    return TrainConfig(**{**settings, **values})


TIMINGS = ("tokens_per_s", "peak_memory_gib", "train_seconds", "data_seconds")   # measured, not computed


def logged(folder: Path) -> list[dict]:
    return [{k: r[k] for k in r if k not in TIMINGS} for r in read_metrics(folder)]


@pytest.mark.parametrize("method", METHODS)
def test_killed_run_resumes_to_the_same_losses(tmp_path, method):
    assert_resumes(tmp_path, method)


def test_killed_run_resumes_with_8bit_optimizer_states(tmp_path):
    """A full fine-tune of the tiny model with `optimizer: adamw8bit`: its 48 x 96 MLP matrices
    (4,608 values) keep torchao's 8-bit states, which the checkpoint carries across the kill."""
    pytest.importorskip("torchao.optim")
    assert_resumes(tmp_path, "full", optimizer="adamw8bit")
    checkpoints = tmp_path / "killed" / "checkpoints"
    saved = torch.load(checkpoints / (checkpoints / "latest").read_text().strip() / "optimizer.pt", weights_only=True)
    kinds = {type(state["exp_avg"]).__name__ for state in saved["state"].values()}
    assert kinds == {"OptimState8bit", "Tensor"}     # 8-bit matrices, full-precision norms and embeddings


def assert_resumes(tmp_path: Path, method: str, **values) -> None:
    whole = config_for(tmp_path, method, "whole", **values)
    train_from_config(whole, console=quiet(), show_progress=False)

    killed = config_for(tmp_path, method, "killed", **values)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(dataclasses.asdict(killed)), "4"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]                   # SIGKILL, not a clean exit
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert not (tmp_path / "killed" / ("model" if method == "full" else "adapter")).exists()   # it never finished
    assert [r["step"] for r in logged(tmp_path / "killed")] == [1, 2, 3, 4]

    train_from_config(dataclasses.replace(killed, resume=True), console=quiet(), show_progress=False)
    want, got = logged(tmp_path / "whole"), logged(tmp_path / "killed")
    for record in want + got:
        record.pop("elapsed_s", None)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert got == want                         # grad norms, rewards and margins too
    assert want[-1]["loss"] != want[0]["loss"]  # training moved, so equality is not that of a frozen run
