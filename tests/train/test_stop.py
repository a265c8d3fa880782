"""SIGTERM stops `velotune train` after the step in progress with a checkpoint of that step, and
`--resume=true` goes on from it (what the studio's Stop button relies on)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.cli.cli_helpers import make_chat_model, write_config

from velotune.train.stop import STOPPED_EXIT_CODE


def train_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "velotune", "train", str(config), "--no-progress", *extra]


def child_env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_sigterm_checkpoints_then_stops_and_resume_goes_on(tmp_path):
    model = make_chat_model(tmp_path / "model")
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model=str(model), dataset="chatterbot:ai,greetings",
                          eval_split=0.0, output_dir=str(run), max_steps=5000, micro_batch_size=2,
                          max_seq_length=64, learning_rate=1e-3, report=False)
    child = subprocess.Popen(train_command(config), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 240
    while len(logged_steps(run)) < 3 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert child.poll() is None, child.communicate()
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == STOPPED_EXIT_CODE, err
    steps = logged_steps(run)
    last = steps[-1]
    assert 3 <= last < 5000
    assert f"stopped on request after step {last} of 5000" in err and "--resume=true" in err
    latest = run / "checkpoints" / f"step-{last}"
    assert latest.is_dir() and json.loads((latest / "state.json").read_text())["step"] == last
    assert (run / "checkpoints" / "latest").read_text().strip().endswith(f"step-{last}")

    done = subprocess.run(train_command(config, "--resume=true", f"--max_steps={last + 2}",
                                        "--resume_allow_changes=[max_steps]"),
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert logged_steps(run) == list(range(1, last + 3))
