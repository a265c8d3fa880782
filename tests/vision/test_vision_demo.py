"""examples/vision_demo.py runs as shipped (shortened to 2 steps): it builds its tiny model with
velotune alone, trains through `velotune train` on the photographs and prints the before/after
table (its full run, 200 steps, names all six photographs; README)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("skimage")


def test_demo_runs(tmp_path, capsys):
    path = Path(__file__).parents[2] / "examples" / "vision_demo.py"
    spec = importlib.util.spec_from_file_location("vision_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main_demo(tmp_path, steps=2) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in demo.PHOTOS)
    assert "photographs named exactly after training" in out
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
