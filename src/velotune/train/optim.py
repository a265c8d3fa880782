"""The optimizer of a run: AdamW (fused CUDA kernel when every parameter is on a GPU), GaLore, or
AdamW with 8-bit states from torchao.

Weight decay applies to matrices only; vectors (norm weights, biases, DoRA magnitudes) are not
decayed, the usual choice since shrinking a norm's scale towards zero is not regularisation.

`adamw8bit` is `torchao.optim.AdamW8bit`, PyTorch's own library, rather than bitsandbytes: the
project keeps transformers, peft and bitsandbytes as test oracles and real clients, never as
imports of the library. torchao's states are the 8-bit format bitsandbytes' AdamW8bit uses (the
same signed and unsigned dynamic maps, bit for bit; one float32 scale per block of 256 values), and
tests/train/test_optim_8bit.py holds the two side by side on the CPU. Its rule for which tensors
stay in full precision is its own: a tensor is kept 8-bit when it has at least 4,096 elements and
a whole number of blocks; any other keeps its moments in the parameter's dtype (`velotune.estimate`
counts exactly this). Its step is one `torch.compile`d function per parameter, so the first step
compiles once per distinct shape (seconds each; on the CPU it needs a C++ compiler) and later
steps run the compiled kernels.

`paged_adamw8bit` and `paged_adamw` (bitsandbytes' states in CUDA unified memory) are refused by
the config check, naming `adamw8bit` instead. torchao has no paged states, and its nearest
offering, `CPUOffloadOptimizer` (states in host memory, the step on the CPU), does not fit this
trainer: it refuses to start without a CUDA or XPU device, it copies each gradient to the host from
a post-accumulate hook during the backward, so the trainer's clipping (`max_grad_norm`) and the
float16 loss scaler's unscale, which run after the backward, would never reach the step, and a
replayed CUDA graph (`cuda_graphs`) runs no hooks at all, so the offloaded parameters would stop
training without an error. Silently different training is worse than a clear refusal.
"""
from __future__ import annotations

import logging
import warnings
from types import ModuleType

import torch
from torch import nn

from velotune.estimate import ADAMW8BIT_BLOCKSIZE
from velotune.train.config import TrainConfig, TrainConfigError

# Devices whose parameters torchao's compiled step runs on (inductor's backends).
EIGHT_BIT_DEVICES = ("cuda", "cpu", "xpu")
# Loggers that report, while torchao is imported, on parts of it the optimizer does not use: its
# CUDA extensions (which a CPU build of torch cannot load) and a deprecated registration of an enum.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def parameter_groups(model: nn.Module, weight_decay: float, modules_lr: float | None = None) -> list[dict]:
    """Matrices (decayed) and vectors (not); with `modules_lr`, the modules trained in full beside
    adapters (`model.modules_to_save`) form their own groups at that learning rate."""
    own_lr = {id(p) for path in getattr(model, "modules_to_save", None) or []
              for p in model.get_submodule(path).parameters()} if modules_lr is not None else set()
    seen: set[int] = set()
    found: dict[tuple[bool, bool], list[nn.Parameter]] = {}    # (own lr, matrix) -> parameters
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            found.setdefault((id(param) in own_lr, param.ndim >= 2), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if matrix else 0.0, **({"lr": modules_lr} if own else {})}
            for (own, matrix), params in sorted(found.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.trainable_modules_lr)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "galore":
        from velotune.train.galore import build_galore

        return build_galore(model, groups, config)
    if config.optimizer == "adamw8bit":
        return build_adamw8bit(groups, config)
    on_gpu = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, eps=config.adam_epsilon,
                             fused=True if on_gpu else None)


def build_adamw8bit(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """torchao's AdamW8bit over `groups`, or a TrainConfigError saying how to get it. Its learning
    rates become tensors (torchao's compiled step reads them so); the scheduler fills them in place."""
    devices = {p.device.type for group in groups for p in group["params"]}
    unsupported = devices - set(EIGHT_BIT_DEVICES)
    if unsupported:
        raise TrainConfigError(f"key 'optimizer': adamw8bit (torchao) does not run on "
                               f"{', '.join(sorted(unsupported))} parameters; use optimizer: adamw")
    optim = import_torchao_optim()
    # torchao's state subclass has no stable hash for AOT autograd's cache; the warning says only
    # that its compiled step is not cached across processes.
    warnings.filterwarnings("ignore", message="OptimState8bit does not implement _stable_hash_for_caching")
    return optim.AdamW8bit(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                           eps=config.adam_epsilon, weight_decay=config.weight_decay, block_size=ADAMW8BIT_BLOCKSIZE)


def import_torchao_optim() -> ModuleType:
    """`torchao.optim`, imported with the loggers in IMPORT_NOISE quietened to errors."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        import torchao.optim
    except ImportError:
        raise TrainConfigError("key 'optimizer': adamw8bit needs torchao, which is not installed "
                               "(pip install torchao, or pip install 'velotune[optim]'), or use optimizer: adamw"
                               ) from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return torchao.optim
