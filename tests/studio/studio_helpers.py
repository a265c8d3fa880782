"""Helpers of the studio tests: a studio server on a free loopback port in a thread, a client
that sends paths exactly as given, and a config that trains long enough to be watched."""
from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

from velotune.studio.server import Studio, StudioServer


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
