"""The errors every layer shares, and the one JSON reader that raises them: the bottom of the
import graph (it imports nothing from velotune).

Why one module: the tokenizer, the loaders, the LoRA files and the exporters all report a bad
model file the same way (`LoadError`, naming the file and the key or tensor), and they all read
small JSON files (config.json, tokenizer_config.json, adapter_config.json). When the error lived
in `loaders/` the tokenizer had to import the loaders that import the tokenizer; here every
package can reach it without climbing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class LoadError(ValueError):
    """A model file we cannot load; the message names the file and the tensor or key."""


class ConfigError(ValueError):
    """A model configuration we cannot build a model from (names the file and the key)."""


def read_json(path: Path) -> Any:
    """The parsed JSON of `path`, or a LoadError naming the file (and the line of a syntax error)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise LoadError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise LoadError(f"{path}: not valid JSON ({exc})") from None
