"""Training for every method (lora, qlora, full, dpo, orpo, kto, simpo, grpo): configs, the
one training loop, checkpoints, reports.

    from velotune.train import load_config, train_from_config
    result = train_from_config(load_config("run.yaml", ["--max_steps=100"]))

`Trainer` is the loop itself, for callers that build the model and examples on their own.
"""
from velotune.train.config import TrainConfig, TrainConfigError, load_config
from velotune.train.run import RunResult, train_from_config
from velotune.train.trainer import Trainer, TrainResult

__all__ = ["RunResult", "TrainConfig", "TrainConfigError", "TrainResult", "Trainer", "load_config",
           "train_from_config"]
