"""Patch-grid geometry of dynamic-resolution vision towers (Qwen2.5-VL) and the decoder's
multimodal rotary positions (M-RoPE), as index arithmetic on small integer tensors.

Design choices:
- An image arrives as a grid (t, h, w) of patches (`image_grid_thw`, t = 1 for a still image), its
  patches laid out block by block: each spatial_merge x spatial_merge block of neighbours is
  consecutive, because the projector merges exactly those into one decoder token.
- Windowed attention (`window_order`) reorders the merge blocks window by window so every window
  is one contiguous segment, and gives the segments' offsets (`cu_seqlens`) for variable-length
  attention; full-attention layers use one segment per image (`image_segments`). The tower
  restores reading order after its last layer. Window sizes count merge blocks:
  window_size / spatial_merge_size / patch_size (Qwen2.5-VL: 112 / 2 / 14 = 4, so 8 x 8 patches).
- `mrope_positions` gives each decoder token three position ids (temporal, height, width):
  text tokens the same id three times, continuing where the text before them (or the image before
  them) ended; an image's tokens the image's start id plus their row and column in the merged grid.
  After an image the text resumes at start + max(rows, columns), as transformers' `get_rope_index`
  counts. It starts from the model's ordinary 1-D positions, so left padding (generation) and
  packed documents (positions that restart) keep working: the shifts an image causes run to the
  end of its document only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_positions(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """[patches, 2] (row, column) of every patch in the tower's block-by-block order."""
    out = []
    for t, h, w in grid.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        block = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
        out.append(block.repeat(t, 1))
    return torch.cat(out)


def image_segments(grid: torch.Tensor) -> torch.Tensor:
    """int32 offsets [frames + 1] of each frame's patches (full attention within a frame)."""
    sizes = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return F.pad(sizes.cumsum(0, dtype=torch.int32), (1, 0))


def window_order(grid: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(merge-block order that makes every `window` x `window` window of merge blocks contiguous,
    int32 offsets of the windows' patches). Windows at the right and bottom edges are smaller."""
    order, bounds, base = [], [0], 0
    unit = merge * merge
    for t, h, w in grid.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        pad_h, pad_w = -gh % window, -gw % window
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
        windows = padded.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        for cells in windows:
            kept = cells[cells >= 0]
            if len(kept):
                order.append(kept + base)
                bounds.append(bounds[-1] + len(kept) * unit)
        base += t * gh * gw
    return torch.cat(order), torch.tensor(bounds, dtype=torch.int32)


def image_token_counts(grid: torch.Tensor, merge: int) -> list[int]:
    """Decoder tokens of each image: its patches over the merge block."""
    return (grid.prod(-1) // (merge * merge)).tolist()


def mrope_positions(input_ids: torch.Tensor, positions: torch.Tensor, grid: torch.Tensor, image_token_id: int,
                    merge: int) -> torch.Tensor:
    """[3, B, T] position ids (temporal, height, width) from the 1-D `positions` [B, T] and the
    images' grids [images, 3], taken in reading order over the rows' runs of image tokens."""
    out = positions.unsqueeze(0).repeat(3, 1, 1)
    shift = torch.zeros_like(positions)
    slots = (input_ids == image_token_id).cpu()
    base = positions.cpu()
    # a document ends where the ordinary positions stop counting up by one
    restarts = torch.ones_like(base, dtype=torch.bool)
    restarts[:, 1:] = base[:, 1:] != base[:, :-1] + 1
    grids = grid.tolist()
    used = 0
    for row in range(input_ids.shape[0]):
        flags, starts_here = slots[row].tolist(), restarts[row].tolist()
        start = 0
        while start < len(flags):
            if not flags[start]:
                start += 1
                continue
            end = start
            while end < len(flags) and flags[end]:
                end += 1
            if used >= len(grids):
                raise ValueError(f"the batch has more runs of image tokens than its {len(grids)} image grid(s)")
            t, h, w = grids[used]
            gh, gw = h // merge, w // merge
            if end - start != t * gh * gw:
                raise ValueError(f"image {used} has a {t}x{h}x{w} patch grid ({t * gh * gw} tokens), its run of "
                                 f"image tokens in row {row} is {end - start} long")
            first = out[0, row, start] + shift[row, start]
            ids = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"))
            out[:, row, start:end] = first + ids.reshape(3, -1).to(out.device)
            stop = end
            while stop < len(flags) and not starts_here[stop]:
                stop += 1
            shift[row, end:stop] += max(gh, gw) - gh * gw
            used += 1
            start = end
    if used != len(grids):
        raise ValueError(f"the batch has {used} run(s) of image tokens for {len(grids)} image grid(s)")
    text = ~slots.to(out.device)
    return torch.where(text, out + shift, out)
