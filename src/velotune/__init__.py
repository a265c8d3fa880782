"""velotune: fast, memory-lean fine-tuning of open LLMs.

Public entry points: `load_model`, and the `velotune` command (`velotune --help`).
"""
from velotune.errors import ConfigError, LoadError
from velotune.loaders import load_model
from velotune.models.config import ModelConfig

__all__ = ["load_model", "LoadError", "ConfigError", "ModelConfig"]
__version__ = "0.1.0"
