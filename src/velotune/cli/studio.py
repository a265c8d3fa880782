"""`velotune studio [RUNS_DIR]`: a local web page to watch, compare, start, stop and try runs.

It serves RUNS_DIR (default ./runs, where `velotune train` and `make demo` put runs) on
http://127.0.0.1:8765/ and prints the URL. Listening on another address exposes your runs and
lets whoever reaches it start training, so it needs --allow-remote, and every request must then
carry a token (--token, or one generated and printed in the URL). The page, its chart library
and every request stay on this machine. See velotune/studio/server.py for the design.
"""
from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

DEFAULT_PORT = 8765


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "studio", help="a local web dashboard: live curves, compare, start/stop runs, chat with an adapter",
        description="Serve a dashboard of the runs in RUNS_DIR on this machine (127.0.0.1 by default).")
    p.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR",
                   help="folder holding the runs (default: ./runs); new runs are created in it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than this machine's loopback address (a token is then required)")
    p.add_argument("--token", help="the token requests must carry (default with --allow-remote: a random one)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def run(args: argparse.Namespace) -> int:
    from velotune.studio.server import Studio, StudioServer

    token = args.token
    if not is_loopback(args.host):
        if not args.allow_remote:
            print(f"velotune studio: error: --host {args.host} would let other machines reach your runs and start "
                  "training; add --allow-remote (a token is then required on every request)", file=sys.stderr)
            return 2
        token = token or secrets.token_urlsafe(24)
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        print(f"velotune studio: error: {runs_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        server = StudioServer((args.host, args.port), Studio(runs_dir, Path.cwd()), token=token)
    except OSError as exc:
        print(f"velotune studio: error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})",
              file=sys.stderr)
        return 2
    print(f"velotune studio: runs in {runs_dir.resolve()}", flush=True)
    print(f"velotune studio: open {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("velotune studio: closed (runs it started keep training)", file=sys.stderr)
    finally:
        server.server_close()
    return 0
