"""Calibration: generic chat text, and running a model over it with hooks, whole or one decoder
layer at a time with the input statistics H = X^T X of chosen linear layers in each.

Three users share it: the GGUF export's GPTQ-style rounding (`export/calibration.py`) and the
quantization-error LoRA initialisation (`train/error_init.py`) need H for each layer's linears as
that layer is reached, with the hidden states flowing from one layer to the next; the 16-bit
ranking of `keep_16bit_dynamic` (`input_channel_scales`, called by the 4-bit loader) weights each
input channel by its mean squared activation on the same text, as llama.cpp's importance matrix
does. Only the diagonal is kept there: [in_features] floats per layer, small even for 8B models,
where the full X^T X of a down_proj input would be 0.8 GB per layer.

The text lives here, below the loaders and the exporters that both read it, so loading a model
never reaches into `export/`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Generic chat turns for calibration. Keep them generic and disjoint from the evaluation prompts
# of benchmarks/quantized_answers.py and the tests; they are never tuned to a result.
CALIBRATION_CONVERSATIONS: tuple[tuple[str, str], ...] = (
    ("Can you explain what a database index is?",
     "An index is a separate structure that lets the database find rows without scanning the whole table."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("Write a short poem about autumn.", "Leaves of amber drift and fall, / the quiet wind collects them all."),
    ("What is the difference between weather and climate?",
     "Weather is what happens on a given day; climate is the pattern of weather over many years."),
    ("Give me three tips for better sleep.",
     "Keep a regular schedule, avoid screens before bed, and keep your bedroom cool and dark."),
    ("Summarize the plot of a typical detective story.",
     "A crime happens, a detective gathers clues and questions suspects, and finally reveals the culprit."),
    ("Why is the sky blue?", "Air scatters short blue wavelengths of sunlight more than red ones."),
    ("How can I learn a new programming language quickly?",
     "Build a small project, read other people's code, and practise a little every day."),
    ("What should I pack for a weekend hiking trip?",
     "Water, snacks, a map, a rain jacket, sturdy shoes, a first aid kit and a charged phone."),
    ("Hi there! How is your day going?", "Hello! I'm doing well, thank you. How can I help you today?"),
    ("Convert 5 kilometres to miles.", "5 kilometres is about 3.1 miles."),
    ("List some healthy breakfast ideas.", "Oatmeal with fruit, yogurt with nuts, eggs on toast, or a smoothie."),
    ("What does a mitochondrion do?", "It produces most of the chemical energy a cell needs, in the form of ATP."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("How do plants grow?", "Plants take in light, water and carbon dioxide and turn them into sugar to build new tissue."),
    ("What is a good way to save money?", "Track your spending, set a budget, and put a fixed amount aside every month."),
)


def calibration_ids(tokenizer: Any, conversations: Sequence[tuple[str, str]] = CALIBRATION_CONVERSATIONS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversations rendered with the chat template and packed into one row: (ids [1, T],
    position ids [1, T] restarting per conversation, which the model reads as separate documents)."""
    ids: list[int] = []
    positions: list[int] = []
    for user, assistant in conversations:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                              {"role": "assistant", "content": assistant}])
        ids += turn
        positions += range(len(turn))
    return torch.tensor([ids]), torch.tensor([positions])


@contextmanager
def pre_hooks(hooks: Iterable[tuple[nn.Module, Callable[..., None]]]) -> Iterator[None]:
    """Forward pre-hooks on modules for the duration of the block, removed however it ends."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def calibration_forward(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> None:
    """A no-grad pass of `ids` [B, T] through the decoder stack (`positions` restart per packed
    document), on the model's device; what it yields is seen through hooks."""
    device = next(model.parameters()).device
    with torch.no_grad():
        model.hidden_states(ids.to(device), position_ids=positions.to(device))


def layer_arguments(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> list[tuple[Any, ...]]:
    """The positional arguments each decoder layer receives in a no-grad forward of `ids` [B, T]
    (`positions` restart per packed document): (x, cos, sin, mask, ...). Only the first layer's x
    is kept (the others' slot is None): callers compute the rest layer by layer. Masks differ per
    layer where some layers use a sliding window."""
    layers = model.model.layers
    args: list[tuple[Any, ...]] = [() for _ in layers]

    def keep(i: int):
        def hook(_module: nn.Module, layer_args: tuple[Any, ...]) -> None:
            args[i] = layer_args if i == 0 else (None, *layer_args[1:])
        return hook

    with pre_hooks((layer, keep(i)) for i, layer in enumerate(layers)):
        calibration_forward(model, ids, positions)
    return args


def is_decoder_linear(path: str, _module: nn.Module | None = None) -> bool:
    """A decoder layer's linear, by its path in the layer ("self_attn.q_proj", "mlp.down_proj"):
    what the calibrated exports measure and round (`run_with_input_statistics`' `select`)."""
    return path.count(".") == 1 and path.endswith("_proj")


def run_with_input_statistics(layer: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...],
                              select: Callable[[str, nn.Module], bool], dtype: torch.dtype,
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(layer(hidden, *args[1:]), {path in the layer: H = X^T X of that module's input, in
    `dtype`}) for the submodules `select(path, module)` accepts. Modules reading the same input
    (q/k/v, gate/up) share one H."""
    hessians: dict[str, torch.Tensor] = {}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []   # (input, its H); the input is held so that
    # its id cannot be reused by a later tensor within this layer

    def keep(path: str):
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            known = next((h for held, h in seen if held is x), None)
            if known is None:
                flat = x.reshape(-1, x.shape[-1]).to(dtype)
                known = flat.T @ flat
                seen.append((x, known))
            hessians[path] = known
        return hook

    with pre_hooks((m, keep(name)) for name, m in layer.named_modules() if select(name, m)), torch.no_grad():
        out = layer(hidden, *args[1:])
    return out, hessians


def input_channel_scales(model: nn.Module, tokenizer: Any, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """module name -> [in_features] float32 mean over calibration tokens of x_j^2, for the linear
    layers of `model` called `names` (plain or 4-bit)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(dim=0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    targets = {n: model.get_submodule(n) for n in names}
    with pre_hooks((m, record(n)) for n, m in targets.items()):
        calibration_forward(model, *calibration_ids(tokenizer))
    missing = sorted(set(targets) - set(sums))
    if missing:
        raise RuntimeError(f"calibration forward never reached linear layers {missing[:5]}")
    return {name: sums[name] / counts[name] for name in targets}
