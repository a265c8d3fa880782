"""The optimizer of a run: AdamW (fused CUDA kernel when every parameter is on a GPU), GaLore, or
bitsandbytes' 8-bit and paged AdamW.

Weight decay applies to matrices only; vectors (norm weights, biases, DoRA magnitudes) are not
decayed, the usual choice since shrinking a norm's scale towards zero is not regularisation.

8-bit and paged optimizers come from bitsandbytes rather than torchao: bitsandbytes is what the
QLoRA ecosystem trains with (its 8-bit AdamW is the one QLoRA's published numbers use), it is
already our test oracle for the 4-bit format and is carried to the GPU machines, and its
optimizers also run on the CPU (bitsandbytes >= 0.45 CPU backend); torchao is not installed.
`adamw8bit` keeps each moment as uint8 codes of the signed dynamic map with one float32 absmax per
256 values (tensors under 4,096 elements keep float32 moments: bitsandbytes' min_8bit_size), which
is what `velotune.estimate` counts. `paged_*` put the states in CUDA unified memory, which the
driver pages out to host memory under pressure instead of failing with out-of-memory.
"""
from __future__ import annotations

import torch
from torch import nn

from velotune.train.config import TrainConfig, TrainConfigError

BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "paged_adamw": "PagedAdamW"}


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
    if config.optimizer in BNB_OPTIMIZERS:
        return build_bitsandbytes(groups, config)
    on_gpu = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, eps=config.adam_epsilon,
                             fused=True if on_gpu else None)


def build_bitsandbytes(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """bitsandbytes' optimizer for `config.optimizer`, or a TrainConfigError saying how to get one."""
    try:
        import bitsandbytes
    except ImportError:
        raise TrainConfigError(f"key 'optimizer': {config.optimizer} needs bitsandbytes, which is not installed "
                               "(pip install bitsandbytes), or use optimizer: adamw") from None
    devices = {p.device.type for group in groups for p in group["params"]}
    unsupported = devices - {"cuda", "cpu", "xpu"}
    if unsupported:
        raise TrainConfigError(f"key 'optimizer': {config.optimizer} (bitsandbytes) does not run on "
                               f"{', '.join(sorted(unsupported))} parameters; use optimizer: adamw")
    if config.optimizer.startswith("paged_") and "cuda" not in devices:
        raise TrainConfigError(f"key 'optimizer': {config.optimizer} pages optimizer states through CUDA unified "
                               f"memory and needs a CUDA GPU; on {', '.join(sorted(devices))} use adamw8bit or adamw")
    from velotune.estimate import ADAMW8BIT_MIN_SIZE

    cls = getattr(bitsandbytes.optim, BNB_OPTIMIZERS[config.optimizer])
    extra = {} if config.optimizer == "paged_adamw" else {"min_8bit_size": ADAMW8BIT_MIN_SIZE}
    return cls(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
               eps=config.adam_epsilon, **extra)
