"""The generation engine: batched prompts of different lengths, one preallocated KV cache,
sampling, stop tokens and stop strings, streaming.

It runs the training model itself (LoRA adapters active and unmerged, 4-bit bases), so it never
holds a second copy of the weights. Prompts are left-padded; positions count real tokens only.
`GenerationRun` advances one token per `step()`, which serves three callers: `generate` (run to
the end), `stream` (yield text as it comes, for `velotune chat`) and the RL trainer (completions
with their token ids).

Prefill is one ordinary forward over the padded prompts. Decode steps run as a static-shape step
(`infer/static.py`), replayed from CUDA graphs on a GPU; `SamplingParams.decode` picks the mode.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from velotune.infer.sampling import SamplingParams, sample
from velotune.infer.static import StaticDecoder
from velotune.infer.cache import KVCache

if TYPE_CHECKING:
    from velotune.models.transformer import Transformer


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]   # generated ids, the stop token included (it is trained in RL)
    text: str              # decoded, without the stop token or stop string
    finish_reason: str     # "stop" or "length"


def stop_ids(model: Transformer, tokenizer: Any | None, requested: Sequence[int] | None) -> list[int]:
    """The requested stop ids, else the tokenizer's (EOS and end of turn), else the config's EOS."""
    if requested is not None:
        return list(requested)
    if tokenizer is not None and getattr(tokenizer, "stop_token_ids", None):
        return list(tokenizer.stop_token_ids)
    eos = model.config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


@contextmanager
def eval_mode(model: Transformer) -> Iterator[None]:
    """Dropout off while decoding; the caller's train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p))
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class GenerationRun:
    """One batch being decoded. `step()` returns the next token of every row ([B]), or None once
    every row has stopped or the token budget is spent."""

    def __init__(self, model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 params: SamplingParams, stop_token_ids: Sequence[int], tokenizer: Any | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> None:
        self.model, self.params, self.tokenizer = model, params, tokenizer
        if params.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode with")
        b, t = input_ids.shape
        device = input_ids.device
        self.mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
        self.pad_id = int(self.stops[0]) if len(self.stops) else 0
        self.generator: torch.Generator | list[torch.Generator] | None = None
        if params.row_seeds is not None:
            if len(params.row_seeds) != b:
                raise ValueError(f"row_seeds holds {len(params.row_seeds)} seeds for {b} prompts")
            self.generator = [torch.Generator(device=device).manual_seed(s) for s in params.row_seeds]
        elif params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(b, model.config.vocab_size, dtype=torch.bool, device=device)
            self.seen.scatter_(1, input_ids, self.mask.bool())
        # The embedding's dtype is what the layers compute in (its table may sit in host memory,
        # after the device weights: models/host_embedding.py).
        dtype = next(model.model.embed_tokens.parameters()).dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # 4-bit bases compute in bf16
            dtype = torch.bfloat16
        length = t + params.max_new_tokens
        self.cache = KVCache(model.config, b, length, dtype, device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        # M-RoPE (Qwen2.5-VL): an image advances the positions by its larger side, not its token
        # count; the generated tokens continue after the prompt's largest position id.
        rope = None if pixel_values is None else model.rope_positions(input_ids, positions, image_grid_thw)
        self.next_pos = positions[:, -1:] + 1 if rope is None else rope.amax(dim=(0, 2))[:, None] + 1
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.stopped_by_string = [False] * b
        self.columns: list[torch.Tensor] = []
        self._host_columns: list[list[int]] = [[] for _ in range(b)]  # columns copied to the host
        with torch.no_grad():  # prefill stays dynamic: one forward over the padded prompts
            embeds = None if pixel_values is None else model.embed_with_images(input_ids, pixel_values, image_grid_thw)
            blocks = None if pixel_values is None else model.image_blocks(input_ids)
            hidden = model.hidden_states(input_ids, self.mask, positions, self.cache, embeds,
                                         embeds_scaled=embeds is not None, image_blocks=blocks,
                                         rope_positions=rope)[:, -1]
            self.logits = model.logits_from_hidden(hidden)
        mode = decode_mode(params.decode, device)
        self.decoder: StaticDecoder | None = None
        if mode != "dynamic":
            valid = torch.ones(b, length, dtype=torch.bool, device=device)
            valid[:, :t] = self.mask.bool()
            self.decoder = StaticDecoder(model, self.cache, valid, self.next_pos, t, self.logits,
                                         use_graphs=mode == "graph", require_graphs=params.decode == "graph")

    @torch.no_grad()
    def step(self) -> torch.Tensor | None:
        if len(self.columns) >= self.params.max_new_tokens or bool(self.done.all()):
            return None
        if self.columns:  # feed the previous token
            self.logits = self._decode(self.columns[-1])
        token = sample(self.logits, self.params, self.seen, self.generator)
        token = torch.where(self.done, torch.full_like(token, self.pad_id), token)
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        self.columns.append(token)
        self.done = self.done | torch.isin(token, self.stops)
        if self.params.stop_strings:
            self._check_stop_strings()
        return token

    def _decode(self, last: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] after feeding `last` [B]."""
        if self.decoder is not None:
            return self.decoder.step(last)
        self.mask = torch.cat([self.mask, torch.ones_like(last)[:, None]], dim=1)
        hidden = self.model.hidden_states(last[:, None], self.mask, self.next_pos, self.cache)[:, -1]
        self.next_pos = self.next_pos + 1
        return self.model.logits_from_hidden(hidden)

    def _check_stop_strings(self) -> None:
        for row in range(len(self.stopped_by_string)):
            if self.done[row]:
                continue
            if any(s in self.raw_text(row) for s in self.params.stop_strings):
                self.done[row] = True
                self.stopped_by_string[row] = True

    def host_ids(self, row: int) -> list[int]:
        """Every generated id of one row. Columns not yet on the host are copied in one transfer
        for all rows (one sync, not one per token)."""
        have = len(self._host_columns[0])
        if have < len(self.columns):
            fresh = torch.stack(self.columns[have:], dim=1).tolist()
            for kept, new in zip(self._host_columns, fresh):
                kept.extend(new)
        return self._host_columns[row]

    def token_ids(self, row: int) -> list[int]:
        """Generated ids of one row, up to and including its stop token."""
        ids = self.host_ids(row)
        stops = set(self.stops.tolist())
        for i, tok in enumerate(ids):
            if tok in stops:
                return ids[: i + 1]
        return list(ids)

    def raw_text(self, row: int) -> str:
        """Decoded generated text, stop tokens dropped, stop strings still in."""
        stops = set(self.stops.tolist())
        ids = [t for t in self.token_ids(row) if t not in stops]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, row: int) -> str:
        """The completion as the user sees it: cut before the first stop string."""
        text = self.raw_text(row)
        for s in self.params.stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return text

    def finish_reason(self, row: int) -> str:
        if self.stopped_by_string[row]:
            return "stop"
        ids = self.token_ids(row)
        return "stop" if ids and ids[-1] in self.stops.tolist() else "length"


def decode_mode(requested: str, device: torch.device) -> str:
    """The decode mode `SamplingParams.decode` asks for, resolved for `device`."""
    if requested == "auto":
        return "graph" if device.type == "cuda" else "static"
    if requested == "graph" and device.type != "cuda":
        raise ValueError(f"decode='graph' needs a CUDA device; the model is on {device} (use 'auto' or 'static')")
    return requested


def generate_tensor(model: Transformer, input_ids: torch.Tensor, params: SamplingParams, *,
                    attention_mask: torch.Tensor | None = None, stop_token_ids: Sequence[int] | None = None,
                    pad_token_id: int | None = None, tokenizer: Any | None = None,
                    pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """[B, prompt + generated] ids; rows that stopped early are filled with the pad id.
    `pixel_values` (and `image_grid_thw` for patch grids): the prompts' images, for a
    vision-language model (read by the prefill)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    stops = stop_ids(model, tokenizer, stop_token_ids)
    with eval_mode(model):
        run = GenerationRun(model, input_ids, attention_mask, params, stops, tokenizer, pixel_values, image_grid_thw)
        if pad_token_id is not None:
            run.pad_id = pad_token_id
        while run.step() is not None:
            pass
    return torch.cat([input_ids, *[c[:, None] for c in run.columns]], dim=1)


def generate(model: Transformer, tokenizer: Any, prompts: Sequence[Sequence[int] | str],
             params: SamplingParams | None = None, pixel_values: torch.Tensor | None = None,
             image_grid_thw: torch.Tensor | None = None) -> list[Completion]:
    """Completions for a batch of prompts (token ids, or strings encoded without chat template);
    `pixel_values`: the prompts' images in the order of their placeholder tokens (vision-language
    models), with their patch grids for a dynamic-resolution tower."""
    params = params or SamplingParams()
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer, params.stop_token_ids)
    input_ids, mask = left_pad(ids, stops[0] if stops else 0, device)
    with eval_mode(model):
        run = GenerationRun(model, input_ids, mask, params, stops, tokenizer,
                            None if pixel_values is None else pixel_values.to(device), image_grid_thw)
        while run.step() is not None:
            pass
    return [Completion(ids[r], run.token_ids(r), run.text(r), run.finish_reason(r)) for r in range(len(ids))]


def stream(model: Transformer, tokenizer: Any, prompt_ids: Sequence[int],
           params: SamplingParams | None = None) -> Iterator[str]:
    """Yield the text of one completion piece by piece as it is generated."""
    params = params or SamplingParams()
    stops = stop_ids(model, tokenizer, params.stop_token_ids)
    device = next(model.parameters()).device
    input_ids, mask = left_pad([prompt_ids], stops[0] if stops else 0, device)
    shown = ""
    with eval_mode(model):
        run = GenerationRun(model, input_ids, mask, params, stops, tokenizer)
        while run.step() is not None:
            text = run.text(0)
            # Hold back a possibly incomplete UTF-8 character or partial stop string.
            if text.endswith("\ufffd"):
                continue
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        final = run.text(0)
        if final.startswith(shown) and len(final) > len(shown):
            yield final[len(shown):]
