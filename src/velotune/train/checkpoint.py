"""Crash-safe training checkpoints: OUTPUT_DIR/checkpoints/step-N plus a `latest` pointer.

A checkpoint is written into a hidden temporary folder next to its final place, its files are
flushed to disk, and only then is the folder renamed (`os.replace`, atomic on one file system) to
step-N; the `latest` pointer (a one-line file) is replaced last, the same way. A run killed at
any moment therefore leaves complete step-N folders, possibly a stale temporary folder (removed
by the next run), and a `latest` that names a complete checkpoint.

What a checkpoint holds, and how it is read back:
- weights.safetensors: the trainable tensors under the model's own parameter names (the LoRA
  tensors, or every weight of a full fine-tune), restored by copying into the live model;
- adapter/ (LoRA runs): the same adapter in PEFT format, usable at once by `velotune chat`;
- optimizer.pt, scheduler.pt, rng.pt: state dicts written by this module and read back with
  `torch.load(weights_only=True)` (plain tensors and numbers only, never arbitrary pickles);
- state.json: step, data position (epoch, batch index in that epoch's sampler order), counters.

FSDP runs (many ranks) write weights and optimizer state as shards instead, into sharded/
through `torch.distributed.checkpoint` (see `velotune.distributed.sharded_checkpoint`): every
rank writes its part into the same temporary folder, then rank 0 adds the small files and
publishes the folder. Such a checkpoint resumes on any number of ranks, one process included.
DDP runs write the single-file format from rank 0 (every rank holds the same trainable weights).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from velotune.distributed import World, barrier, broadcast_object
from velotune.distributed import sharded_checkpoint as sharded
from velotune.safetensors_file import save_safetensors

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
STEP_PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
WEIGHTS_FILE = "weights.safetensors"
FILES = ("state.json", WEIGHTS_FILE, "optimizer.pt", "scheduler.pt", "rng.pt")
SHARDED_DIR = "sharded"                        # FSDP: weights + optimizer state, one part per rank
SHARDED_FILES = ("state.json", "scheduler.pt", "rng.pt")


class CheckpointError(ValueError):
    """A checkpoint we cannot resume from; the message names the folder and the file or tensor."""


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # data position: the epoch of the next micro-batch ...
    batch_index: int = 0          # ... and its index in that epoch's sampler order
    tokens_seen: int = 0          # input tokens (padding excluded) processed so far
    target_tokens_seen: int = 0
    elapsed_s: float = 0.0        # training wall time before this process
    global_micro_batch: int = 0   # micro_batch_size x ranks: what batch_index counts (0 = unknown)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def write_atomically(output_dir: str | Path, step: int, write: Callable[[Path], None], keep: int = 0, *,
                     world: World = World(), write_every_rank: Callable[[Path], None] | None = None) -> Path:
    """Run `write(folder)` into a temporary folder, then publish it as step-N and point `latest`
    at it. `keep` > 0 removes all but the newest `keep` checkpoints afterwards.

    With many ranks every rank calls this: `write_every_rank(folder)` runs on all of them first
    (sharded state), `write` and the publishing on rank 0 only, with barriers in between, so the
    folder is renamed only when every rank's part is on disk."""
    root = checkpoints_dir(output_dir)
    final = root / f"{STEP_PREFIX}{step}"
    owner = broadcast_object(os.getpid(), world)       # rank 0's pid names the folder on every rank
    temp = root / f"{TEMP_PREFIX}{STEP_PREFIX}{step}-{owner}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
    barrier(world)
    try:
        if write_every_rank is not None:
            write_every_rank(temp)
            barrier(world)
        if world.is_main:
            write(temp)
            _flush_folder(temp)
    except BaseException:
        if world.is_main:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    if world.is_main:
        _publish(root, temp, final, keep, output_dir)
    barrier(world)
    return final


def _publish(root: Path, temp: Path, final: Path, keep: int, output_dir: str | Path) -> None:
    if final.exists():                    # the same step written again (a resumed run): swap it
        old = root / f"{TEMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)
    pointer = root / f"{TEMP_PREFIX}{LATEST}-{os.getpid()}"
    pointer.write_text(final.name + "\n", encoding="utf-8")
    os.replace(pointer, root / LATEST)
    if keep > 0:
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)


def _flush_folder(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Temporary folders left by a run that was killed while writing."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for path in root.glob(f"{TEMP_PREFIX}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    return sorted((p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and _step(p) >= 0), key=_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    pointer = checkpoints_dir(output_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoints_dir(output_dir) / pointer.read_text(encoding="utf-8").strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer}: names {folder.name}, which does not exist")
    return folder


def resolve_resume(resume: bool | str, output_dir: str | Path) -> Path | None:
    """The checkpoint folder `resume` asks for: None for `false` (or `true` with none saved yet),
    `latest` for `true`, or the given folder (a run's output_dir resumes from its latest)."""
    if resume is False:
        return None
    if resume is True:
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if (path / CHECKPOINTS_DIR).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: has no checkpoints/latest to resume from")
        return found
    if not path.is_dir():
        raise CheckpointError(f"resume: {path} is not a checkpoint folder")
    return path


# --- contents ---------------------------------------------------------------------------------

def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, each stored once (tied weights share one entry)."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().contiguous().cpu() for name in trainable_tensors_names(model)}


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss = random.getstate()
    return {
        "python": torch.tensor(words, dtype=torch.int64), "python_version": version, "python_gauss": gauss,
        "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": pos, "numpy_has_gauss": has_gauss,
        "numpy_cached": cached, "numpy_kind": kind,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_kind"], state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_contents(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   state: TrainState, extra: Callable[[Path], None] | None = None, *,
                   with_weights: bool = True) -> None:
    """The single-process files; `with_weights` False leaves weights and optimizer state out
    (an FSDP checkpoint holds them in sharded/, see `write_sharded`)."""
    (folder / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
    if with_weights:
        save_safetensors(trainable_tensors(model), str(folder / WEIGHTS_FILE))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(rng_state(), folder / "rng.pt")
    if extra is not None:
        extra(folder)


def write_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """This rank's shards of weights and optimizer state (every rank calls it)."""
    sharded.save_sharded(folder / SHARDED_DIR, model, optimizer)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def read_contents(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                  world: World = World()) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from `folder`; return the training state.
    A sharded (FSDP) checkpoint loads into a model of any world size, a plain one included; a
    single-process checkpoint also loads into an FSDP model. With many ranks every rank calls it."""
    is_sharded = (folder / SHARDED_DIR).is_dir()
    required = SHARDED_FILES if is_sharded else FILES
    missing = [name for name in required if not (folder / name).is_file()]
    if is_sharded and not sharded.is_sharded(folder / SHARDED_DIR):
        missing.append(f"{SHARDED_DIR}/{sharded.METADATA_FILE}")
    if missing:
        raise CheckpointError(f"{folder}: incomplete checkpoint, missing {', '.join(missing)}")
    device = next(model.parameters()).device
    # Every file is read before anything is applied, so a damaged one changes nothing.
    schedule = _read(folder / "scheduler.pt", lambda path: torch.load(path, weights_only=True))
    rng = _read(folder / "rng.pt", lambda path: torch.load(path, weights_only=True))
    state = _read(folder / "state.json", lambda path: TrainState(**json.loads(path.read_text(encoding="utf-8"))))
    if is_sharded:
        if not all(p.requires_grad for p in model.parameters()):
            raise CheckpointError(f"{folder}: a sharded (full fine-tuning) checkpoint, but this run trains "
                                  "adapters; resume it with method: full")
        sharded.load_sharded(folder / SHARDED_DIR, model, optimizer, world)
    else:
        saved = _read(folder / WEIGHTS_FILE, lambda path: load_file(str(path)))
        check_saved_weights(folder, saved, model)
        optim_state = _read(folder / "optimizer.pt",
                            lambda path: torch.load(path, map_location=device, weights_only=True))
        if is_fsdp(model):
            sharded.load_full_into_sharded(model, optimizer, saved, optim_state)
        else:
            _read(folder / "optimizer.pt", lambda path: optimizer.load_state_dict(optim_state))
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)
    _read(folder / "scheduler.pt", lambda path: scheduler.load_state_dict(schedule))
    set_rng_state(rng)
    return state


T = TypeVar("T")


def _read(path: Path, read: Callable[[Path], T]) -> T:
    """`read(path)`, or a CheckpointError naming the file and an earlier checkpoint to use."""
    try:
        return read(path)
    except Exception as exc:   # a truncated or foreign file fails in zip, pickle, safetensors, JSON or load_state_dict
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
        folder = path.parent
        earlier = [p for p in list_checkpoints(folder.parent.parent) if _step(p) < _step(folder)]
        fix = f"resume from {earlier[-1]} (--resume={earlier[-1]})" if earlier else "start afresh"
        raise CheckpointError(f"{path}: cannot be read ({cause}); the checkpoint is damaged: {fix}") from exc


def _step(folder: Path) -> int:
    """N of a step-N folder, -1 for any other name."""
    name = folder.name
    return int(name[len(STEP_PREFIX):]) if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit() else -1


def check_saved_weights(folder: Path, saved: dict[str, torch.Tensor], model: nn.Module) -> None:
    """The saved tensors are exactly this run's trainable ones, with the same shapes."""
    params = dict(model.named_parameters())
    names = set(trainable_tensors_names(model))
    if set(saved) != names:
        extra, lacking = sorted(set(saved) - names), sorted(names - set(saved))
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: does not match this run's trainable weights "
                              f"(unexpected: {extra[:3]}, missing: {lacking[:3]}); was it written with "
                              "another method, model or target_modules?")
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model's is {tuple(params[name].shape)}")


def trainable_tensors_names(model: nn.Module) -> list[str]:
    """Names `trainable_tensors` would write, without copying anything (tied weights once)."""
    seen: set[int] = set()
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            names.append(name)
    return names
