"""Shared by the studio tests: a tiny chat model, a runs folder holding one finished run, and a
studio server on a free loopback port in a thread (stopped, with every run it started, at the end)."""
from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from tests.cli.cli_helpers import make_chat_model, write_config

from velotune.cli import main
from velotune.studio.server import Studio, StudioServer


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


def long_run_config(model: Path, steps: int = 5000) -> str:
    """A form config that trains long enough to be watched and stopped."""
    return (f"model: {model}\ndataset: chatterbot:ai,greetings\neval_split: 0.0\nmax_steps: {steps}\n"
            "micro_batch_size: 2\nmax_seq_length: 64\nlearning_rate: 1.0e-3\nreport: false\n")


class Client:
    def __init__(self, server: StudioServer) -> None:
        self.server = server
        self.port = server.server_address[1]

    def request(self, method: str, path: str, body=None, *, headers=None, raw: bytes | None = None):
        """(status, decoded JSON) of one request; `path` is sent as is (no normalising)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        kind = response.getheader("Content-Type") or ""
        return response.status, json.loads(payload) if kind.startswith("application/json") else payload

    def wait_status(self, name: str, wanted: set[str], timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, run = self.request("GET", f"/api/runs/{name}")
            if status == 200 and run["status"] in wanted:
                return run
            time.sleep(0.3)
        raise AssertionError(f"run {name} never reached {wanted}: {run}")


def serve(runs_dir: Path, base_dir: Path, token: str | None = None) -> StudioServer:
    server = StudioServer(("127.0.0.1", 0), Studio(runs_dir, base_dir), token=token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def shut(server: StudioServer) -> None:
    for run in server.studio.launcher.launched.values():
        if run.process.poll() is None:
            run.process.kill()
        run.process.wait(timeout=60)
    server.shutdown()
    server.server_close()


@pytest.fixture
def studio(tmp_path, finished_run):
    """A Client of a studio over tmp_path/runs, which holds a copy of the finished run as 'done'."""
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(finished_run, runs / "done")
    server = serve(runs, tmp_path)
    yield Client(server)
    shut(server)
