"""The trainer tests' fixture: tiny model folders, built once per test on demand."""
from __future__ import annotations

import pytest
from tests.train.train_helpers import save_tiny


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    """family -> folder of a saved tiny model (built once per test)."""
    made = {}

    def get(family: str = "llama"):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family)
            save_tiny(family, made[family])
        return made[family]
    return get
