"""What the studio knows about the runs under RUNS_DIR, read from the files a run writes.

A run is a folder directly under RUNS_DIR holding any of config.yaml, metrics.jsonl, an adapter/
or model/, checkpoints or a report (what `velotune train` writes; train/run_folder.py). The
studio only reads these folders: it never writes into one, renames or deletes one; the only
folder it creates is a new run's empty folder, with os.mkdir, which fails rather than reuse an
existing one. Its own files (launch configs, logs) live in RUNS_DIR/.studio.

Run names come from URLs, so every name is checked (`run_folder`) before it is joined to
RUNS_DIR: one path segment of letters, digits, '.', '_' and '-', not starting with a dot, whose
resolved folder sits directly under RUNS_DIR (no '..', no '/', no symlink out).

Metrics are read incrementally (`MetricsTail`): the byte offset of the last complete line is
kept, so a growing metrics.jsonl costs only its new lines, and a half-written last line waits
for the next read. A file that shrank (a resumed run drops the interrupted run's later records)
is read again from the start.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velotune.train.checkpoint import list_checkpoints
from velotune.train.metrics import METRICS_FILE
from velotune.train.run_folder import CONFIG_FILE, RESULT_DIRS, run_contents
from velotune.train.samples import SAMPLES_FILE

STUDIO_DIR = ".studio"                         # the studio's own files inside RUNS_DIR
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
# A run not started by this studio counts as training while its metrics changed this recently.
ACTIVE_SECONDS = 60.0


class StudioError(Exception):
    """A request the studio refuses; `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def run_folder(runs_dir: Path, name: str, *, must_exist: bool = True) -> Path:
    """RUNS_DIR/NAME after checking NAME; 400 for a name that is not one folder under RUNS_DIR,
    404 for an unknown run (when `must_exist`)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise StudioError(400, f"bad run name {name!r}: a run name is one folder name of letters, digits, "
                               "'.', '_' and '-' (at most 100), not starting with a dot")
    folder = runs_dir / name
    if folder.resolve().parent != runs_dir.resolve():
        raise StudioError(400, f"bad run name {name!r}: it leads outside {runs_dir}")
    if must_exist and not is_run(folder):
        raise StudioError(404, f"no run {name!r} in {runs_dir}")
    return folder


def is_run(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.startswith(".") and (
        (folder / CONFIG_FILE).is_file() or (folder / METRICS_FILE).is_file() or bool(run_contents(folder)))


def list_runs(runs_dir: Path, starting: Collection[str] = ()) -> list[Path]:
    """The run folders under RUNS_DIR; `starting` names runs whose folder may still be empty."""
    if not runs_dir.is_dir():
        return []
    return sorted((p for p in runs_dir.iterdir() if NAME_PATTERN.fullmatch(p.name)
                   and (is_run(p) or p.name in starting and p.is_dir())), key=lambda p: p.name)


@dataclass
class MetricsTail:
    """New complete records of one metrics.jsonl since the last `read`."""
    path: Path
    offset: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """(new records, whether the file restarted: then they replace all earlier ones)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return [], False
        restarted = size < self.offset
        if restarted:
            self.offset, self.records = 0, []
        if size == self.offset:
            return [], False
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(size - self.offset)
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        new = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue                              # a damaged line is skipped, not fatal for the page
            if isinstance(record, dict) and "step" in record:
                new.append(record)
        self.records += new
        return new, restarted


def read_config(folder: Path) -> tuple[str, dict[str, Any]]:
    """(config.yaml as written, its values), or ("", {}) before the run wrote it."""
    import yaml

    path = folder / CONFIG_FILE
    if not path.is_file():
        return "", {}
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError:
        values = None
    return text, values if isinstance(values, dict) else {}


def read_samples(folder: Path) -> list[dict[str, Any]]:
    path = folder / SAMPLES_FILE
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def exports_of(folder: Path) -> list[dict[str, Any]]:
    """Each export-* folder with its files (name, bytes)."""
    found = []
    for export in sorted(p for p in folder.glob("export-*") if p.is_dir()):
        files = sorted(f for f in export.rglob("*") if f.is_file())
        found.append({"name": export.name, "path": str(export),
                      "files": [{"name": str(f.relative_to(export)), "bytes": f.stat().st_size} for f in files]})
    return found


def result_dir(folder: Path) -> Path | None:
    """The trained adapter/ or model/ folder, once the run has saved it."""
    for name in RESULT_DIRS:
        if (folder / name / "config.json").is_file() or (folder / name / "adapter_config.json").is_file():
            return folder / name
    return None


def files_status(folder: Path) -> str:
    """The status of a run the studio did not start, from its files."""
    if result_dir(folder) is not None:                # written once, at the end of the run
        return "finished"
    metrics = folder / METRICS_FILE
    if metrics.is_file() and time.time() - metrics.stat().st_mtime < ACTIVE_SECONDS:
        return "running"
    if list_checkpoints(folder):
        return "stopped"
    return "incomplete"


def summary(folder: Path, status: str, tail: MetricsTail | None = None) -> dict[str, Any]:
    """The run as the run list shows it."""
    _, config = read_config(folder)
    records = tail.records if tail is not None else []
    steps = [r["step"] for r in records if "loss" in r]
    return {"name": folder.name, "status": status, "method": config.get("method"),
            "model": config.get("model") or ("SmolLM2-135M-Instruct" if config else None),
            "max_steps": config.get("max_steps"), "last_step": steps[-1] if steps else 0,
            "last_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
            "has_result": result_dir(folder) is not None,
            "checkpoints": [p.name for p in list_checkpoints(folder)]}
