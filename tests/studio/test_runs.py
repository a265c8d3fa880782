"""What the studio reads from run folders: metrics.jsonl read incrementally (a half-written line
waits, a file that shrank is read again, a damaged line is skipped), run names that cannot leave
RUNS_DIR (a symlink out included), and the status of runs it did not start."""
from __future__ import annotations

import json
import os
import time

import pytest

from velotune.studio.runs import ACTIVE_SECONDS, MetricsTail, StudioError, files_status, list_runs, run_folder


def test_metrics_are_read_as_they_grow(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == ([], False)                             # not written yet
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert tail.read() == ([{"step": 1, "loss": 2.0}], False)    # the half line waits
    with path.open("a") as handle:
        handle.write('ss": 1.5}\nnot json\n{"step": 3, "loss": 1.2}\n')
    assert tail.read() == ([{"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.2}], False)
    assert [r["step"] for r in tail.records] == [1, 2, 3]
    path.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")   # a resumed run rewrote it shorter
    assert tail.read() == ([{"step": 1, "loss": 9.0}], True)
    assert tail.records == [{"step": 1, "loss": 9.0}]


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", ".studio", "", "a\x00b", "x" * 101])
def test_names_that_are_not_one_folder_are_refused(tmp_path, name):
    with pytest.raises(StudioError) as caught:
        run_folder(tmp_path, name)
    assert caught.value.status == 400 and "bad run name" in str(caught.value)


def test_a_symlink_out_of_the_runs_folder_is_refused(tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    runs.mkdir()
    elsewhere.mkdir()
    (elsewhere / "config.yaml").write_text("method: lora\n")
    os.symlink(elsewhere, runs / "link")
    with pytest.raises(StudioError, match="leads outside"):
        run_folder(runs, "link")


def test_unknown_and_non_run_folders(tmp_path):
    (tmp_path / "notes").mkdir()                                  # a folder that holds no run
    with pytest.raises(StudioError) as caught:
        run_folder(tmp_path, "notes")
    assert caught.value.status == 404
    assert list_runs(tmp_path) == [] and list_runs(tmp_path / "missing") == []
    assert list_runs(tmp_path, starting={"notes"}) == [tmp_path / "notes"]


def test_status_of_runs_started_elsewhere(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert files_status(run) == "running"
    old = time.time() - ACTIVE_SECONDS - 5
    os.utime(run / "metrics.jsonl", (old, old))
    assert files_status(run) == "incomplete"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    assert files_status(run) == "stopped"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert files_status(run) == "finished"
