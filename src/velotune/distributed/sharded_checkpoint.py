"""FSDP checkpoints through `torch.distributed.checkpoint` (DCP): every rank writes its own
shards of the weights and of the optimizer state, and DCP's metadata records where each slice of
each tensor lives, so a checkpoint written by N ranks loads on M ranks (or on one process, into
a plain unsharded model): the reader asks for the slices it owns and DCP reads just those.

State dicts go through `get_state_dict`/`set_state_dict`, which name optimizer state by
parameter name (not by position) and give the same keys for an FSDP model and a plain one; that
is what makes the cross-world-size resume work.

A checkpoint written by one process in the single-file format (weights.safetensors +
optimizer.pt) can also be loaded into an FSDP model: `load_full_into_sharded` gives each rank its
slice of the full tensors (each rank reads the files; use shared storage).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from velotune.distributed.world import World

METADATA_FILE = ".metadata"


def _checkpoint_api():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    return dcp, get_state_dict, set_state_dict


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's shards into `folder` (collective: every rank calls it)."""
    dcp, get_state_dict, _ = _checkpoint_api()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def is_sharded(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file()


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
    """Load weights and optimizer state from a DCP folder into `model` (FSDP or plain) and
    `optimizer`, resharding to this run's world size (collective when `world` is distributed; a
    one-process world reads alone even inside a process group)."""
    dcp, get_state_dict, set_state_dict = _checkpoint_api()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder), no_dist=not world.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_into_sharded(model: nn.Module, optimizer: torch.optim.Optimizer,
                           weights: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """A single-process checkpoint (full tensors by name; `optimizer.state_dict()` with parameters
    numbered in optimizer order) into an FSDP model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    names = {id(param): name for name, param in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {ordered[index]: value for index, value in optim_state["state"].items()},
        "param_groups": [{**group, "params": [ordered[i] for i in group["params"]]}
                         for group in optim_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def full_state_on_rank0(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, whole and on the CPU, on rank 0 (empty elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
