"""`velotune train` never loses a run and never mixes two: a folder holding a run is refused
(every byte of it left as it was) unless resumed or `overwrite_output_dir` moves it aside whole;
a resume with a changed config prints the differences and refuses those that break exactness."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from tests.cli.cli_helpers import write_config

from velotune.cli import main
from velotune.train.checkpoint import list_checkpoints


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_chat_model, tmp_path_factory):
    """(config, run folder) of a finished two-step run with checkpoints and an HF export."""
    folder = tmp_path_factory.mktemp("guarded")
    config = write_config(
        folder / "run.yaml", model=str(tiny_chat_model), dataset="chatterbot:greetings", eval_split=0.2,
        output_dir=str(folder / "run"), max_steps=2, save_steps=1, micro_batch_size=4, max_seq_length=96,
        lora_r=4, export=["hf"])
    assert main(["train", str(config), "--no-progress"]) == 0
    return config, folder / "run"


def copy_of(run: Path, tmp_path: Path, config: Path) -> tuple[Path, Path]:
    """A copy of the run and a config pointing at it (the fixture's run stays untouched)."""
    shutil.copytree(run, tmp_path / "run")
    values = {**yaml.safe_load(config.read_text()), "output_dir": str(tmp_path / "run")}
    return tmp_path / "run", write_config(tmp_path / "run.yaml", **values)


def test_a_finished_run_is_refused_and_left_as_it_was(finished_run, tmp_path, capsys):
    run, config = copy_of(finished_run[1], tmp_path, finished_run[0])
    before = checksums(run)
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"velotune train: error: {run}: holds a finished run (adapter/, checkpoints/, report.md, "
                   "export-hf/); --resume=true to continue it from step-2, --overwrite_output_dir=true to move it "
                   "aside (run.replaced-TIME) and start afresh, or choose another output_dir")
    assert checksums(run) == before
    # An unfinished run (checkpoints, no adapter yet) is refused the same way.
    for name in ("adapter", "export-hf", "report.md"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    assert main(["train", str(config), "--no-progress", "--max_steps=3"]) == 2
    assert "holds an unfinished run (checkpoints/); --resume=true to continue it from step-2" in capsys.readouterr().err


def test_overwrite_moves_the_old_run_aside_whole(finished_run, tmp_path, capsys):
    run, config = copy_of(finished_run[1], tmp_path, finished_run[0])
    before = checksums(run)
    assert main(["train", str(config), "--no-progress", "--overwrite_output_dir=true", "--max_steps=1"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and checksums(aside[0]) == before
    assert f"the earlier run in {run} was moved to {aside[0]}" in capsys.readouterr().out.replace("\n", "")
    assert [p.name for p in list_checkpoints(run)] == ["step-1"]          # nothing of the old run mixed in
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 1


def test_resume_with_a_changed_config_names_the_differences(finished_run, tmp_path, capsys):
    run, config = copy_of(finished_run[1], tmp_path, finished_run[0])
    before = checksums(run)
    assert main(["train", str(config), "--no-progress", "--resume=true", "--max_steps=4", "--logging_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"velotune train: error: {run / 'config.yaml'}: resuming step-2 with a changed config "
                   "(max_steps 2 -> 4; logging_steps 1 -> 2); the changes to max_steps break exact resumption (the data order, "
                   "schedule or update differ from the run that wrote the checkpoint): pass "
                   "--resume_allow_changes=[max_steps] to resume anyway")
    assert checksums(run) == before
    assert main(["train", str(config), "--no-progress", "--resume=true", "--max_steps=4", "--logging_steps=2",
                 "--resume_allow_changes=[max_steps]"]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert f"resume: config changed since {run / 'config.yaml'} (max_steps 2 -> 4; logging_steps 1 -> 2)" in out
    assert (run / "config.before-step-2.yaml").read_text() == (finished_run[1] / "config.yaml").read_text()
    assert [p.name for p in list_checkpoints(run)] == ["step-1", "step-2", "step-3", "step-4"]
