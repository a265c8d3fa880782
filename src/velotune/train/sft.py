"""Supervised fine-tuning as an objective of the training loop (contract: rl/objective.py): lora,
qlora and full.

A micro-batch is a collated `Batch` of examples (padding-free on a GPU, `padding_free`; padded;
or packed rows), made by the trainer's sampler; the model's forward with labels gives (summed
token loss, target count) through the chunked linear cross-entropy, and the step divides by its
target tokens over every micro-batch and rank. Only this objective's micro-batches come in few
shapes (bucketed widths, or packed rows), so only it runs from CUDA graphs
(train/graphed_step.py). Evaluation is the mean token loss (`evaluate_loss`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from velotune import distributed, kernels
from velotune.data import Example
from velotune.data.batching import Batch
from velotune.distributed import World
from velotune.models.masks import DocumentSpans


def padding_free(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether micro-batches are laid end to end (data/batching.py:collate_flat): on a GPU in half
    precision, where attention over packed documents is flash's variable-length kernel, for a
    dense model whose attention takes it (`ModelConfig.varlen_attention`: soft-capped or sink
    attention runs explicitly over a whole-row mask, where a long flat row costs more than
    padding) and whose head size the flash kernel takes (`kernels.varlen_flash_supports`: the
    reference path reads document offsets on the host, which a CUDA graph capture cannot).
    Mixture-of-experts models keep padded rows: their load-balancing loss is per row."""
    config = getattr(model, "config", None)
    return (device.type == "cuda" and amp_dtype in (torch.bfloat16, torch.float16) and config is not None
            and getattr(config, "varlen_attention", False) and not getattr(config, "num_experts", 0)
            and kernels.varlen_flash_supports(config.head_dim))


def batch_documents(batch: Batch, device: torch.device) -> DocumentSpans | None:
    """A padding-free batch's document spans on `device` (None for padded or packed batches)."""
    if batch.get("cu_seqlens") is None:
        return None
    return DocumentSpans(batch["cu_seqlens"].to(device, non_blocking=True),   # type: ignore[union-attr]
                         int(batch["max_document_length"]))                      # type: ignore[arg-type]


def batch_images(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """{"pixel_values": the batch's images on `device`, and "image_grid_thw" where the images
    are patch grids} for a batch with images, else {}."""
    if batch.get("pixel_values") is None:
        return {}
    return {key: batch[key].to(device, non_blocking=True)   # type: ignore[union-attr]
            for key in ("pixel_values", "image_grid_thw") if batch.get(key) is not None}


class SFTObjective:
    metric_names: tuple[str, ...] = ()
    rows_per_unit = 1
    graphable = True

    def __init__(self, *, pad_id: int, micro_batch_size: int) -> None:
        self.pad_id, self.micro_batch_size = pad_id, micro_batch_size

    def sampling(self, micro_batch_size: int, accumulation: int) -> tuple[int, int]:
        return accumulation, micro_batch_size

    def micro_batches(self, runner: Any, drawn: list[Batch], step: int | None) -> list[Batch]:
        return drawn                              # the sampler collated them

    def count(self, batch: Batch) -> int:
        return int(batch["num_target_tokens"])    # type: ignore[arg-type]

    def tokens(self, batch: Batch) -> int:
        return int(batch.get("num_tokens") or 0)  # type: ignore[arg-type]

    def loss(self, runner: Any, batch: Batch) -> tuple[torch.Tensor, dict]:
        return runner.forward_sum(batch)[0], {}

    def evaluate(self, runner: Any, examples: Sequence[Example]) -> dict[str, float]:
        return {"eval_loss": evaluate_loss(runner.model, examples, self.micro_batch_size, self.pad_id,
                                           runner.amp_dtype, world=runner.world, device=runner.device,
                                           flat=runner.flat)}


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  amp_dtype: torch.dtype | None = None, *, world: World = World(),
                  device: torch.device | None = None, flat: bool = False) -> float:
    """Mean token loss of `model` over `examples` (summed over all targets, then divided). With
    many ranks each evaluates its share and the sums are added over ranks (every rank calls it).
    `flat`: padding-free batches (as the trainer trains on a GPU)."""
    if not examples:
        raise ValueError("no eval examples: set eval_split > 0 or eval_dataset")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)     # loss sum, target count
    try:
        for batch in distributed.rank_eval_batches(examples, batch_size, pad_id, world, flat=flat):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                            labels=batch["labels"].to(device), return_logits=False,
                            documents=batch_documents(batch, device), **batch_images(batch, device))
            sums[0] += out.loss_sum.double()
            sums[1] += out.num_targets
    finally:
        model.train(was_training)
    loss_sum, targets = distributed.global_sum(sums, world).tolist()
    return loss_sum / targets


