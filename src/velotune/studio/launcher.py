"""Starting, watching and stopping training runs from the studio.

A run is `velotune train CONFIG --no-progress` in a child process, exactly what a user would
type, so the studio adds no second way to train: the config the form sends is checked by the
CLI's own `load_config_text` (unknown keys get the same did-you-mean, errors name "form line N")
and the memory estimate is the one `velotune estimate` and the out-of-memory advice use
(`train/oom.py`). The checked config is written, data paths made absolute, to
RUNS_DIR/.studio/NAME.yaml and the child's output to RUNS_DIR/.studio/NAME.log; the run folder
RUNS_DIR/NAME is created empty by os.mkdir, which refuses a folder that exists, so a launch can
never touch an earlier run.

One run at a time: a second launch while a run trains (one this studio started, or one whose
metrics are still growing) is refused, since two runs on one GPU slow each other down and may
not fit together. Stop sends SIGTERM, on which the trainer finishes the step in progress, writes a
checkpoint and exits with 143 (train/stop.py). Children run in their own session: closing the
studio leaves a training run alone.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from velotune.studio.runs import STUDIO_DIR, StudioError, run_folder
from velotune.train.config import TrainConfig, TrainConfigError, load_config_text
from velotune.train.stop import STOPPED_EXIT_CODE

FORM_NAME = "form"                      # how errors name the form's YAML ("form line 3")
# Keys the studio sets itself or that would reuse an earlier run's folder.
STUDIO_KEYS = {"output_dir": "the studio puts every run in RUNS_DIR/NAME: set the run name instead",
               "resume": "the studio starts new runs; resume one with velotune train CONFIG --resume=true",
               "overwrite_output_dir": "the studio never replaces a run folder: choose a new run name"}
LOG_TAIL_BYTES = 4000


@dataclass
class Launched:
    name: str
    process: subprocess.Popen
    log: Path
    stop_requested: bool = False

    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "stopping" if self.stop_requested else "running"
        if code == 0:
            return "finished"
        # before its first step a run has nothing to checkpoint, and SIGTERM simply ends it
        return "stopped" if code == STOPPED_EXIT_CODE or self.stop_requested and code == -signal.SIGTERM else "failed"

    def log_tail(self) -> str:
        try:
            data = self.log.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")


def check_form(runs_dir: Path, name: str, text: str, base_dir: Path) -> TrainConfig:
    """The form's config, checked as `velotune train` checks a file, with output_dir set to
    RUNS_DIR/NAME; relative data paths are read from `base_dir` (where the studio was started)."""
    folder = run_folder(runs_dir, name, must_exist=False)
    if not isinstance(text, str):
        raise StudioError(400, "the config must be YAML text")
    try:
        values = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError:
        values = None                                  # load_config_text names the error and line
    for key, why in STUDIO_KEYS.items():
        if isinstance(values, dict) and key in values:
            raise StudioError(400, f"{FORM_NAME}: key {key!r} cannot be set here: {why}")
    try:
        return load_config_text(text, FORM_NAME, base_dir, [f"--output_dir={folder.resolve()}"])
    except TrainConfigError as exc:
        raise StudioError(400, str(exc)) from None


@functools.lru_cache(maxsize=8)
def model_config(model: str | None, stamp: float | None) -> Any:
    """The model's config (reading a GGUF's takes seconds: its vocabulary is parsed too), kept
    per model and file time, so checking a form again is instant."""
    from velotune.loaders import open_checkpoint

    return open_checkpoint(model).config


def _stamp(model: str | None) -> float | None:
    try:
        return Path(model).stat().st_mtime if model is not None else None
    except OSError:
        return None


def estimate_for(config: TrainConfig) -> dict[str, Any]:
    """The memory estimate of `config` on this machine's GPU: the estimate's parts in GiB, whether
    it fits and, when not, the config changes the out-of-memory advice would give. `error` when
    the model's config cannot be read (the run may still be started)."""
    import torch

    from velotune.errors import ConfigError, LoadError
    from velotune.estimate import GIB, RESERVED_GIB, EstimateError, estimate
    from velotune.train.oom import candidates, combined, peak, setup_of

    try:
        model = model_config(config.model, _stamp(config.model))
        found = estimate(model, setup_of(config))
    except (LoadError, ConfigError, EstimateError, OSError, ValueError) as exc:
        return {"error": f"no estimate: {exc}"}
    result: dict[str, Any] = {
        "total_gib": found.total / GIB, "weights_gib": found.weights / GIB, "optimizer_gib": found.optimizer / GIB,
        "activations_gib": found.activations / GIB, "gradients_gib": found.gradients / GIB,
        "parameters": found.parameters, "trainable_parameters": found.trainable_parameters}
    cuda = torch.cuda.is_available() and config.device != "cpu"
    if not cuda:
        result.update(device="CPU (no GPU in use): the estimate is what a GPU would need", fits=None)
        return result
    props = torch.cuda.get_device_properties(0)
    budget = int((config.memory_budget_gib * GIB) if config.memory_budget_gib else props.total_memory)
    budget -= int(RESERVED_GIB * GIB)
    result.update(device=f"{props.name}, {props.total_memory / GIB:.1f} GiB", budget_gib=budget / GIB,
                  fits=found.total <= budget)
    if not result["fits"]:
        changes = candidates(model, config, budget)
        single = [" ".join(c.options) for c in changes if peak(model, c) <= budget]
        together = combined(model, changes, budget) if changes else None
        result["fixes"] = single or ([" ".join(together.options)] if together else [])
    return result


def child_environment() -> dict[str, str]:
    """This environment, with the folder this velotune is imported from first on the path: the
    child trains with the same code as the studio that started it (also from a source checkout
    whose relative PYTHONPATH means nothing in the child's working directory)."""
    import velotune

    root = str(Path(velotune.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


class Launcher:
    """The runs this studio started, by name."""

    def __init__(self, runs_dir: Path, base_dir: Path) -> None:
        self.runs_dir, self.base_dir = runs_dir, base_dir
        self.launched: dict[str, Launched] = {}
        self.lock = threading.Lock()

    def busy_with(self, active_elsewhere: list[str]) -> str | None:
        """The name of a run that holds the device, if any."""
        for name, run in self.launched.items():
            if run.process.poll() is None:
                return name
        return active_elsewhere[0] if active_elsewhere else None

    def start(self, name: str, text: str, active_elsewhere: list[str]) -> Launched:
        with self.lock:
            config = check_form(self.runs_dir, name, text, self.base_dir)
            folder = Path(config.output_dir)
            if folder.exists():
                raise StudioError(409, f"run {name!r} exists already ({folder}); choose another name "
                                       "(the studio never replaces a run)")
            busy = self.busy_with(active_elsewhere)
            if busy is not None:
                raise StudioError(409, f"the device is busy: run {busy!r} is training; stop it or wait for it "
                                       "to finish before starting another")
            own = self.runs_dir / STUDIO_DIR
            own.mkdir(parents=True, exist_ok=True)
            try:
                folder.mkdir()                         # fails on a folder that appeared meanwhile
            except FileExistsError:
                raise StudioError(409, f"run {name!r} exists already ({folder})") from None
            config_file = own / f"{name}.yaml"
            config_file.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")
            log = own / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "velotune", "train", str(config_file), "--no-progress"],
                    cwd=self.base_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=child_environment())
            run = self.launched[name] = Launched(name, process, log)
            return run

    def stop(self, name: str) -> Launched:
        run = self.launched.get(name)
        if run is None:
            raise StudioError(409, f"run {name!r} was not started by this studio; stop it where it runs "
                                   "(Ctrl-C, or kill -TERM its process: it checkpoints first)")
        if run.process.poll() is not None:
            raise StudioError(409, f"run {name!r} is not training ({run.status()})")
        run.stop_requested = True
        run.process.send_signal(signal.SIGTERM)
        return run
