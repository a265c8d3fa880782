"""Shared by the command tests: one tiny chat model, and one short training run of it through
`velotune train` (the demo's path, shortened), reused by the chat/generate/eval tests."""
from __future__ import annotations

import pytest
import torch
from tests.cli.cli_helpers import make_chat_model, write_config

from velotune.cli import main


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def demo_run(tiny_chat_model, tmp_path_factory):
    """(config path, output folder, exit code, captured-by-file output) of a shortened demo."""
    folder = tmp_path_factory.mktemp("demo")
    config = write_config(
        folder / "demo.yaml", model=str(tiny_chat_model), dataset="chatterbot:ai,greetings,botprofile",
        eval_split=0.2, output_dir=str(folder / "run"), method="lora", lora_r=8, lora_alpha=16,
        max_steps=16, micro_batch_size=8, learning_rate=2.0e-2, warmup_steps=1, max_seq_length=192,
        sample_prompts=2, save_steps=8, eval_steps=8, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", str(config), "--no-progress"])
    finally:
        torch.set_num_threads(before)
    return config, folder / "run", code
