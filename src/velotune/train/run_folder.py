"""The run folder (`output_dir`): never lose a run, never mix two.

A second `velotune train` into a folder that holds a run used to replace its adapter, config,
metrics and report while its exports stayed behind, stale, and a checkpointed run restarted
without `resume` overwrote step-2 and pointed `latest` back at it while the old run's later
checkpoints remained. So, before anything is written:

- a folder holding a run (its adapter/ or model/, checkpoints, report.md or exports) is refused,
  with the ways on, unless the run is resumed (`resume`) or
  `overwrite_output_dir: true`, which renames the whole folder to OUTPUT_DIR.replaced-TIME: one
  rename, atomic, and the old run stays complete and apart;
- a resumed run compares its config with the config.yaml of the run it resumes and prints every
  difference. Differences in keys that leave the numbers alone (logging, saving, eval, exports,
  memory layout: `FREE_ON_RESUME`) pass; any other (data, schedule, optimizer, model, method,
  lengths, seed) breaks the exact continuation a checkpoint promises and is refused unless named
  in `resume_allow_changes`. The earlier config is kept as config.before-step-N.yaml.

Every rank runs the checks (they only read, so all agree); rank 0 alone renames and writes.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from velotune import distributed
from velotune.distributed import World
from velotune.train.checkpoint import CHECKPOINTS_DIR, list_checkpoints, resolve_resume
from velotune.train.config import TrainConfig, TrainConfigError, config_yaml

CONFIG_FILE = "config.yaml"
RESULT_DIRS = ("adapter", "model")
RUN_FILES = ("report.md",)
INVOCATION_KEYS = frozenset({"resume", "overwrite_output_dir", "resume_allow_changes", "output_dir"})
# Keys that leave the numbers of a resumed run alone. micro_batch_size may change with the number
# of ranks: what must stay is micro_batch_size x ranks, which `Trainer.resume_from` checks.
FREE_ON_RESUME = frozenset({
    "micro_batch_size", "logging_steps", "save_steps", "save_total_limit", "eval_steps", "sample_prompts", "report",
    "report_to",
    "export", "on_nonfinite", "divergence_ratio", "gradient_checkpointing", "offload_checkpoints",
    "offload_embeddings", "mlp_chunk_tokens", "memory_budget_gib", "cuda_graphs", "distributed", "fsdp_cpu_offload",
    "profile_steps"})


def run_contents(folder: Path) -> list[str]:
    """What of a run `folder` holds (e.g. ["adapter/", "checkpoints/", "report.md"]); [] for none."""
    if not folder.is_dir():
        return []
    found = [f"{name}/" for name in RESULT_DIRS if (folder / name).is_dir()]
    found += [f"{CHECKPOINTS_DIR}/"] if list_checkpoints(folder) else []
    found += [name for name in RUN_FILES if (folder / name).is_file()]
    found += sorted(f"{p.name}/" for p in folder.glob("export-*") if p.is_dir())
    return found


def prepare_run_folder(config: TrainConfig, world: World, say: Callable[..., Any]) -> Path | None:
    """Check `config.output_dir` as the module docstring says, move an earlier run aside when
    asked, write config.yaml; the checkpoint to resume from, or None. Every rank calls it."""
    out = Path(config.output_dir)
    resume_from = resolve_resume(config.resume, out)
    contents = run_contents(out)
    in_place = resume_from is not None and resume_from.parent == out / CHECKPOINTS_DIR
    moved = None
    if contents and not in_place:
        if not config.overwrite_output_dir:
            raise TrainConfigError(refusal(out, contents, config.resume is not False))
        if world.is_main:
            moved = move_aside(out)
    changed = resume_from is not None and check_resume_config(config, resume_from, say)
    if world.is_main:
        if moved is not None:
            say(f"overwrite_output_dir: the earlier run in {out} was moved to {moved}", markup=False)
        out.mkdir(parents=True, exist_ok=True)
        if changed and in_place:
            kept = out / f"config.before-{resume_from.name}.yaml"
            (out / CONFIG_FILE).replace(kept)
            say(f"resume: the earlier config is kept as {kept}", markup=False)
        (out / CONFIG_FILE).write_text(config_yaml(config), encoding="utf-8")
    distributed.barrier(world)
    return resume_from


def refusal(out: Path, contents: list[str], resume_asked: bool) -> str:
    """The one-line error for a folder that holds a run, with every way on."""
    checkpoints = list_checkpoints(out)
    finished = any(f"{name}/" in contents for name in RESULT_DIRS)
    what = "a finished run" if finished else "an unfinished run"
    held = ", ".join(contents[:6]) + (", ..." if len(contents) > 6 else "")
    if checkpoints and not resume_asked:
        ways = f"--resume=true to continue it from {checkpoints[-1].name}, "
    elif resume_asked:
        ways = "no checkpoint to resume from (save_steps was 0); "
    else:
        ways = ""
    return (f"{out}: holds {what} ({held}); {ways}--overwrite_output_dir=true to move it aside "
            f"({out.name}.replaced-TIME) and start afresh, or choose another output_dir")


def move_aside(out: Path) -> Path:
    """Rename `out` to a free OUTPUT_DIR.replaced-TIME[-N] beside it; the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    out.rename(target)
    return target


def config_differences(old: dict[str, Any], config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key both configs have and that differs, the keys
    that only say how this command was started (`INVOCATION_KEYS`) left out."""
    new = dataclasses.asdict(config)
    return [(key, old[key], new[key]) for key in new
            if key in old and old[key] != new[key] and key not in INVOCATION_KEYS]


def check_resume_config(config: TrainConfig, resume_from: Path, say: Callable[..., Any]) -> bool:
    """Print how `config` differs from the config.yaml of the run that wrote `resume_from`;
    refuse differences that break exact resumption unless `resume_allow_changes` names them.
    True when something differs."""
    run = resume_from.parent.parent if resume_from.parent.name == CHECKPOINTS_DIR else None
    saved = run / CONFIG_FILE if run is not None else None
    if saved is None or not saved.is_file():
        say(f"resume: no {CONFIG_FILE} beside {resume_from} to compare this config with", markup=False)
        return False
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{saved}: not valid YAML ({exc})") from None
    if not isinstance(old, dict):
        raise TrainConfigError(f"{saved}: expected a mapping of keys to values")
    changes = config_differences(old, config)
    if not changes:
        return False
    shown = "; ".join(f"{key} {old_value!r} -> {new_value!r}" for key, old_value, new_value in changes)
    blocked = [key for key, _, _ in changes
               if key not in FREE_ON_RESUME and key not in config.resume_allow_changes]
    if blocked:
        raise TrainConfigError(
            f"{saved}: resuming {resume_from.name} with a changed config ({shown}); the changes to "
            f"{', '.join(blocked)} break exact resumption (the data order, schedule or update differ from the run "
            f"that wrote the checkpoint): pass --resume_allow_changes=[{','.join(blocked)}] to resume anyway")
    say(f"resume: config changed since {saved} ({shown})", markup=False)
    return True
