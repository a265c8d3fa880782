"""The studio's API over HTTP: what it shows of a finished run, the event stream, starting and
stopping a run, chatting with an adapter, and every bad request (unknown run, malformed config,
path traversal in run names, a second run on a busy device, no token, a foreign Host) answered
with a clear error that changes nothing on disk."""
from __future__ import annotations

import hashlib
import http.client
import json
import re
import time
from pathlib import Path

import pytest
from tests.studio.studio_helpers import Client, long_run_config, serve, shut

from velotune.cli import main
from velotune.train.metrics import read_metrics


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes: what "changes nothing" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_listed_with_its_config_answers_and_metrics(studio: Client):
    status, runs = studio.request("GET", "/api/runs")
    assert status == 200
    (done,) = runs
    assert done["name"] == "done" and done["status"] == "finished" and done["last_step"] == 8
    assert done["method"] == "lora" and done["has_result"] and done["max_steps"] == 8
    status, detail = studio.request("GET", "/api/runs/done")
    assert status == 200 and "max_steps: 8" in detail["config"]
    assert len(detail["samples"]) == 2 and all(s["before"] is not None and s["after"] is not None
                                               for s in detail["samples"])
    status, records = studio.request("GET", "/api/runs/done/metrics")
    folder = studio.server.studio.runs_dir / "done"
    assert status == 200 and records == read_metrics(folder)
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 4, 8]


def test_the_event_stream_sends_the_runs_and_every_record(studio: Client):
    connection = http.client.HTTPConnection("127.0.0.1", studio.port, timeout=30)
    connection.request("GET", "/api/events")
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events: dict[str, object] = {}
    while len(events) < 2:
        name = response.fp.readline().decode().strip()
        data = response.fp.readline().decode().strip()
        assert response.fp.readline() == b"\n"
        events[name.removeprefix("event: ")] = json.loads(data.removeprefix("data: "))
    connection.close()
    assert events["metrics"]["run"] == "done"
    assert events["metrics"]["records"] == read_metrics(studio.server.studio.runs_dir / "done")
    assert [r["name"] for r in events["runs"]] == ["done"]


def test_check_gives_the_estimate_and_did_you_mean(studio: Client, studio_model):
    status, checked = studio.request("POST", "/api/check", {"name": "new", "config": long_run_config(studio_model)})
    assert status == 200 and checked["ok"] and checked["method"] == "lora"
    estimate = checked["estimate"]
    assert estimate["total_gib"] > 0 and estimate["trainable_parameters"] > 0
    assert estimate["fits"] is None and estimate["device"].startswith("CPU")     # no GPU here
    assert checked["output_dir"] == str(studio.server.studio.runs_dir / "new")
    assert not (studio.server.studio.runs_dir / "new").exists()                   # checking creates nothing


@pytest.mark.parametrize("config, message", [
    ("learning_rat: 1.0e-4\n", r"form line 1: unknown key 'learning_rat'.*did you mean.*learning_rate"),
    ("max_steps: [1\n", "form: not valid YAML"),
    ("- just\n- a list\n", "form: expected a mapping"),
    ("max_steps: -3\n", "form line 1: key 'max_steps' must not be negative"),
    ("method: sft\n", "form line 1: key 'method' must be one of"),
    ("dataset: missing.jsonl\n", "form line 1: key 'dataset': no file 'missing.jsonl'"),
    ("output_dir: /tmp/elsewhere\n", "key 'output_dir' cannot be set here"),
    ("overwrite_output_dir: true\n", "never replaces a run folder"),
])
def test_malformed_configs_are_refused_and_change_nothing(studio: Client, config, message):
    runs = studio.server.studio.runs_dir
    before = snapshot(runs.parent)
    for path in ("/api/check", "/api/runs"):
        status, answer = studio.request("POST", path, {"name": "bad", "config": config})
        assert status == 400, answer
        assert re.search(message, answer["error"]), answer["error"]
    assert snapshot(runs.parent) == before and not (runs / "bad").exists()


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/api/runs/nope", None), ("GET", "/api/runs/nope/metrics", None),
    ("POST", "/api/runs/nope/stop", {}), ("POST", "/api/runs/nope/chat", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_unknown_runs_are_404(studio: Client, method, path, body):
    status, answer = studio.request(method, path, body)
    assert status == 404 and "no run 'nope'" in answer["error"]


@pytest.mark.parametrize("path", [
    "/api/runs/..%2F..%2Fetc", "/api/runs/%2E%2E", "/api/runs/..", "/api/runs/.studio", "/api/runs/a%2Fb/metrics",
    "/api/runs/%2Fetc%2Fpasswd",
])
def test_traversing_run_names_in_urls_are_refused(studio: Client, path):
    status, answer = studio.request("GET", path)
    assert status == 400 and "bad run name" in answer["error"]


@pytest.mark.parametrize("name", ["../outside", "..", "a/b", ".hidden", "/tmp/abs", "", 7, "x" * 101])
def test_traversing_names_cannot_start_runs(studio: Client, studio_model, name):
    root = studio.server.studio.runs_dir.parent
    before = snapshot(root)
    status, answer = studio.request("POST", "/api/runs", {"name": name, "config": long_run_config(studio_model)})
    assert status == 400 and "bad run name" in answer["error"]
    assert snapshot(root) == before and not studio.server.studio.launcher.launched


@pytest.mark.parametrize("path", ["/static/..%2Fserver.py", "/static/../server.py", "/static/vendor/../../runs.py",
                                  "/static/nothing.js"])
def test_static_files_are_only_the_shipped_ones(studio: Client, path):
    status, answer = studio.request("GET", path)
    assert status == 404, answer


def test_bad_bodies(studio: Client):
    status, answer = studio.request("POST", "/api/check", raw=b"name=x", headers={"Content-Type": "text/plain"})
    assert status == 415 and "JSON" in answer["error"]
    status, answer = studio.request("POST", "/api/check", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = studio.request("POST", "/api/check", ["a", "list"])
    assert status == 400 and "JSON object" in answer["error"]
    status, answer = studio.request("POST", "/api/runs/done/chat", {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and "messages[0]" in answer["error"]
    status, answer = studio.request("POST", "/api/runs/done/chat", {"messages": []})
    assert status == 400


def test_start_busy_device_existing_name_stop(studio: Client, studio_model):
    runs = studio.server.studio.runs_dir
    done_before = snapshot(runs / "done")
    status, answer = studio.request("POST", "/api/runs", {"name": "done", "config": long_run_config(studio_model)})
    assert status == 409 and "exists already" in answer["error"]

    status, started = studio.request("POST", "/api/runs", {"name": "long", "config": long_run_config(studio_model)})
    assert status == 201 and started == {"name": "long", "status": "running"}
    status, answer = studio.request("POST", "/api/runs", {"name": "second", "config": long_run_config(studio_model)})
    assert status == 409 and "the device is busy: run 'long' is training" in answer["error"]
    assert not (runs / "second").exists() and not (runs / ".studio" / "second.yaml").exists()
    status, answer = studio.request("POST", "/api/runs/long/chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 409 and "no trained adapter" in answer["error"]

    deadline = time.monotonic() + 240                  # wait for a few logged steps, then stop
    while len(read_metrics(runs / "long")) < 3 and time.monotonic() < deadline:
        assert studio.server.studio.launcher.launched["long"].process.poll() is None, \
            (runs / ".studio" / "long.log").read_text()
        time.sleep(0.3)
    status, answer = studio.request("POST", "/api/runs/long/stop", {})
    assert status == 202 and answer["status"] == "stopping"
    run = studio.wait_status("long", {"stopped", "failed", "finished"})
    assert run["status"] == "stopped", run["log"]
    last = read_metrics(runs / "long")[-1]["step"]
    assert run["checkpoints"][-1] == f"step-{last}" and "stopped on request" in run["log"]
    status, answer = studio.request("POST", "/api/runs/long/stop", {})
    assert status == 409 and "not training (stopped)" in answer["error"]
    assert snapshot(runs / "done") == done_before


def test_a_run_not_started_here_cannot_be_stopped_here(studio: Client):
    status, answer = studio.request("POST", "/api/runs/done/stop", {})
    assert status == 409 and "not started by this studio" in answer["error"]


def test_chat_answers_as_the_adapter_does(studio: Client):
    import torch

    from velotune.infer.engine import generate
    from velotune.infer.prompts import prompt_ids
    from velotune.infer.sampling import SamplingParams
    from velotune.loaders import load_model
    from velotune.studio.chat import MAX_NEW_TOKENS

    messages = [{"role": "user", "content": "What are you?"}]
    status, answer = studio.request("POST", "/api/runs/done/chat", {"messages": messages})
    assert status == 200, answer
    model, tokenizer = load_model(str(studio.server.studio.runs_dir / "done" / "adapter"), device=torch.device("cpu"))
    expected, = generate(model, tokenizer, [prompt_ids(tokenizer, messages)],
                         SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0))
    assert answer["reply"] == expected.text.strip()


def test_a_token_is_required_when_set_and_foreign_hosts_are_refused(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    server = serve(runs, tmp_path, token="s3cret")
    try:
        client = Client(server)
        assert client.request("GET", "/api/runs")[0] == 401
        assert client.request("GET", "/api/runs?token=wrong")[0] == 401
        assert client.request("GET", "/api/runs?token=s3cret") == (200, [])
        assert client.request("GET", "/api/runs", headers={"X-Studio-Token": "s3cret"}) == (200, [])
        assert client.request("GET", "/?token=s3cret")[0] == 200
        assert client.request("GET", "/static/studio.js")[0] == 200          # the page's code holds no data
        assert client.request("POST", "/api/check", {"name": "x", "config": ""})[0] == 401
        assert client.request("GET", "/api/events")[0] == 401
        status, answer = client.request("GET", "/api/runs?token=s3cret", headers={"Host": "evil.example:80"})
        assert status == 403 and "not this studio's address" in answer["error"]
    finally:
        shut(server)


def test_listening_elsewhere_needs_allow_remote(capsys):
    assert main(["studio", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_the_command_prints_its_url_and_serves_the_page(tmp_path):
    import os
    import subprocess
    import sys
    import urllib.request

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-m", "velotune", "studio", str(tmp_path / "runs"), "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        lines = [child.stdout.readline(), child.stdout.readline()]
        assert lines[0].startswith("velotune studio: runs in ") and str(tmp_path / "runs") in lines[0]
        assert lines[1].startswith("velotune studio: open http://127.0.0.1:")
        url = lines[1].split("open ")[1].strip()
        with urllib.request.urlopen(url, timeout=30) as page:
            html = page.read().decode()
        assert "<title>velotune studio</title>" in html and "uPlot.iife.min.js" in html
        with urllib.request.urlopen(url + "static/vendor/uPlot.iife.min.js", timeout=30) as script:
            assert len(script.read()) > 40_000                 # the vendored chart library, served locally
        with urllib.request.urlopen(url + "api/runs", timeout=30) as runs:
            assert json.loads(runs.read()) == []
    finally:
        child.terminate()
        child.wait(timeout=30)
