"""The studio's HTTP server: a JSON API, a server-sent-event stream and the page's static files.

Why the standard library (`http.server.ThreadingHTTPServer`) rather than an ASGI stack: the
studio serves one person on their own machine, a handful of requests a second and one event
stream per open tab; a thread per connection is plenty, training runs in child processes, and
`velotune studio` then works on every install with no new dependency. Live curves are
server-sent events (one long GET, `text/event-stream`), which browsers reconnect by themselves;
websockets would add a protocol for no two-way need. The charts are uPlot (MIT, 50 KB), vendored
under static/vendor so the page loads nothing from the internet: no data leaves the machine.

API (JSON in and out; every error is {"error": message} with a 4xx status, and changes nothing):
  GET  /api/runs                    the runs under RUNS_DIR with their status
  GET  /api/runs/NAME               one run: config, held-out answers before/after, exports, log
  GET  /api/runs/NAME/metrics       every metrics.jsonl record
  GET  /api/events                  event stream: "runs" (the list, when it changes) and
                                    "metrics" ({run, records, restart}: new records of every run)
  POST /api/check   {name, config}  the config checked as `velotune train` checks it + the memory estimate
  POST /api/runs    {name, config}  start `velotune train` on it (one run at a time)
  POST /api/runs/NAME/stop          SIGTERM: checkpoint after the step in progress, then exit
  POST /api/runs/NAME/chat {messages}   the finished run's adapter answers

Safety: bound to 127.0.0.1 unless told otherwise (cli/studio.py); then a token is required on
every API request (`?token=` or the X-Studio-Token header, compared in constant time; the page
and its scripts, which hold no data, load without it and pass it on from the URL). On loopback
the Host header must name the loopback address the page was served from, which defeats DNS
rebinding, and POSTs must be application/json, which a cross-site form cannot send.
"""
from __future__ import annotations

import hmac
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from velotune.studio.chat import ChatModels, check_messages
from velotune.studio.launcher import Launcher, check_form, estimate_for
from velotune.studio.runs import (
    MetricsTail,
    StudioError,
    exports_of,
    files_status,
    list_runs,
    read_config,
    read_samples,
    run_folder,
    summary,
)
from velotune.train.metrics import METRICS_FILE

MAX_BODY = 1 << 20
EVENT_INTERVAL_S = 0.5
HEARTBEAT_S = 15.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}


class Studio:
    """The state behind the API: the runs folder, the runs this studio started, the chat model."""

    def __init__(self, runs_dir: Path, base_dir: Path) -> None:
        self.runs_dir, self.base_dir = runs_dir.resolve(), base_dir.resolve()
        self.launcher = Launcher(self.runs_dir, self.base_dir)
        self.chat = ChatModels()

    def folder(self, name: str) -> Path:
        """RUNS_DIR/NAME of a known run (one this studio started counts from its first moment)."""
        return run_folder(self.runs_dir, name, must_exist=name not in self.launcher.launched)

    def folders(self) -> list[Path]:
        return list_runs(self.runs_dir, self.launcher.launched)

    def status(self, folder: Path) -> str:
        launched = self.launcher.launched.get(folder.name)
        return launched.status() if launched is not None else files_status(folder)

    def runs(self, tails: dict[str, MetricsTail] | None = None) -> list[dict[str, Any]]:
        tails = tails if tails is not None else {}
        found = []
        for folder in self.folders():
            tail = tails.get(folder.name) or MetricsTail(folder / METRICS_FILE)
            if folder.name not in tails:
                tail.read()
            found.append(summary(folder, self.status(folder), tail))
        return found

    def active_elsewhere(self) -> list[str]:
        return [f.name for f in self.folders()
                if f.name not in self.launcher.launched and files_status(f) == "running"]

    def detail(self, name: str) -> dict[str, Any]:
        folder = self.folder(name)
        text, _ = read_config(folder)
        launched = self.launcher.launched.get(name)
        return {**summary(folder, self.status(folder)), "config": text, "samples": read_samples(folder),
                "exports": exports_of(folder), "path": str(folder),
                "log": launched.log_tail() if launched is not None else ""}

    def metrics(self, name: str) -> list[dict[str, Any]]:
        tail = MetricsTail(self.folder(name) / METRICS_FILE)
        tail.read()
        return tail.records

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        config = check_form(self.runs_dir, body.get("name"), body.get("config"), self.base_dir)
        exists = (self.runs_dir / body["name"]).exists()
        return {"ok": True, "output_dir": config.output_dir, "method": config.method, "estimate": estimate_for(config),
                "warnings": [f"run {body['name']!r} exists already: choose another name"] if exists else []}

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        run = self.launcher.start(body.get("name"), body.get("config"), self.active_elsewhere())
        return {"name": run.name, "status": run.status()}

    def stop(self, name: str) -> dict[str, Any]:
        self.folder(name)
        run = self.launcher.stop(name)
        return {"name": name, "status": run.status()}

    def reply(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        folder = self.folder(name)
        messages = check_messages(body.get("messages"))
        return {"reply": self.chat.reply(folder, messages)}


class StudioServer(ThreadingHTTPServer):
    daemon_threads = True                 # an open event stream does not keep the process alive

    def __init__(self, address: tuple[str, int], studio: Studio, token: str | None = None) -> None:
        super().__init__(address, Handler)
        self.studio, self.token = studio, token
        self.stopping = threading.Event()
        self.static = resources.files("velotune.studio") / "static"

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/" + (f"?token={self.token}" if self.token else "")

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


class Handler(BaseHTTPRequestHandler):
    server: StudioServer
    server_version = "velotune-studio"

    def log_message(self, format: str, *args: Any) -> None:     # quiet: the terminal is the user's
        pass

    # --- plumbing -----------------------------------------------------------------------------

    def send_json(self, status: int, value: Any) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def allowed(self) -> bool:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if self.server.token is not None and url.path.startswith("/api/"):   # the page's own files hold no data
            given = self.headers.get("X-Studio-Token") or (query.get("token") or [""])[0]
            if not hmac.compare_digest(given.encode(), self.server.token.encode()):
                self.send_json(HTTPStatus.UNAUTHORIZED, {"error": "this studio needs its token: open the URL it printed"})
                return False
        host = self.server.server_address[0]
        if host in LOOPBACK or host.startswith("127."):
            port = self.server.server_address[1]
            named = (self.headers.get("Host") or "").rsplit(":", 1)
            if len(named) != 2 or named[0].strip("[]") not in (*LOOPBACK, host) or named[1] != str(port):
                self.send_json(HTTPStatus.FORBIDDEN, {"error": f"Host {self.headers.get('Host')!r} is not this "
                                                               "studio's address"})
                return False
        return True

    def body(self) -> dict[str, Any]:
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise StudioError(415, "send JSON (Content-Type: application/json)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise StudioError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise StudioError(413, f"request body over {MAX_BODY} bytes")
        try:
            value = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StudioError(400, "the request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise StudioError(400, "the request body must be a JSON object")
        return value

    def segments(self) -> list[str]:
        """The path's segments, each percent-decoded on its own: an encoded '/' stays inside its
        segment, where the run-name check refuses it."""
        return [unquote(part) for part in urlsplit(self.path).path.split("/") if part]

    def handle_request(self, method: str) -> None:
        if not self.allowed():
            return
        try:
            self.route(method, self.segments())
        except StudioError as exc:
            self.send_json(exc.status, {"error": str(exc)})

    def do_GET(self) -> None:
        self.handle_request("GET")

    def do_POST(self) -> None:
        self.handle_request("POST")

    # --- routes -------------------------------------------------------------------------------

    def route(self, method: str, parts: list[str]) -> None:
        studio = self.server.studio
        if method == "GET" and parts in ([], ["index.html"]):
            return self.send_static("index.html")
        if method == "GET" and len(parts) >= 2 and parts[0] == "static":
            return self.send_static("/".join(parts[1:]))
        if not parts or parts[0] != "api":
            raise StudioError(404, f"no page {urlsplit(self.path).path!r}")
        api = parts[1:]
        if method == "GET":
            if api == ["runs"]:
                return self.send_json(200, studio.runs())
            if api == ["events"]:
                return self.stream_events()
            if len(api) == 2 and api[0] == "runs":
                return self.send_json(200, studio.detail(api[1]))
            if len(api) == 3 and api[0] == "runs" and api[2] == "metrics":
                return self.send_json(200, studio.metrics(api[1]))
        elif method == "POST":
            if api == ["check"]:
                return self.send_json(200, studio.check(self.body()))
            if api == ["runs"]:
                return self.send_json(201, studio.start(self.body()))
            if len(api) == 3 and api[0] == "runs" and api[2] == "stop":
                return self.send_json(202, studio.stop(api[1]))
            if len(api) == 3 and api[0] == "runs" and api[2] == "chat":
                return self.send_json(200, studio.reply(api[1], self.body()))
        raise StudioError(404 if method in ("GET", "POST") else 405, f"no API {method} {urlsplit(self.path).path!r}")

    def send_static(self, name: str) -> None:
        files = {p.name: p for p in self.server.static.iterdir() if p.is_file()}
        files.update({f"vendor/{p.name}": p for p in (self.server.static / "vendor").iterdir() if p.is_file()})
        if name not in files:                  # only the files shipped with the package, by exact name
            raise StudioError(404, f"no file {name!r}")
        data = files[name].read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", STATIC_TYPES.get(Path(name).suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def stream_events(self) -> None:
        """Server-sent events until the browser goes away or the studio stops: the run list when
        it changes, every run's new metric records (all of them first)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        studio, tails = self.server.studio, {}
        last_runs, last_beat = None, time.monotonic()
        try:
            while not self.server.stopping.is_set():
                for folder in studio.folders():
                    tail = tails.setdefault(folder.name, MetricsTail(folder / METRICS_FILE))
                    records, restart = tail.read()
                    if records or restart:
                        self.send_event("metrics", {"run": folder.name, "records": records, "restart": restart})
                runs = studio.runs(tails)
                if runs != last_runs:
                    self.send_event("runs", runs)
                    last_runs = runs
                if time.monotonic() - last_beat > HEARTBEAT_S:
                    self.wfile.write(b": still here\n\n")
                    self.wfile.flush()
                    last_beat = time.monotonic()
                self.server.stopping.wait(EVENT_INTERVAL_S)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send_event(self, event: str, data: Any) -> None:
        self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()
