"""The studio tests' fixtures: a tiny chat model, a finished run of it, and a studio over a runs
folder holding a copy of that run (stopped, with every run it started, at the end)."""
from __future__ import annotations

import shutil

import pytest
import torch
from tests.cli.cli_helpers import make_chat_model, write_config
from tests.studio.studio_helpers import Client, serve, shut

from velotune.cli import main


@pytest.fixture(scope="session")
def studio_model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("studio-model"))


@pytest.fixture(scope="session")
def finished_run(studio_model, tmp_path_factory):
    """A run folder trained by `velotune train` (8 steps, answers before/after), to copy into runs folders."""
    folder = tmp_path_factory.mktemp("finished")
    config = write_config(folder / "done.yaml", model=str(studio_model), dataset="chatterbot:ai,greetings",
                          eval_split=0.2, output_dir=str(folder / "done"), max_steps=8, micro_batch_size=4,
                          learning_rate=1e-2, max_seq_length=128, sample_prompts=2, eval_steps=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(config), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "done"


@pytest.fixture
def studio(tmp_path, finished_run):
    """A Client of a studio over tmp_path/runs, which holds a copy of the finished run as 'done'."""
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(finished_run, runs / "done")
    server = serve(runs, tmp_path)
    yield Client(server)
    shut(server)
