"""QuantState: everything besides the packed codes that a 4-bit weight needs to be read back.

It mirrors bitsandbytes' state field for field, so a `*-bnb-4bit` checkpoint maps onto it without
loss: `absmax` holds one scale per `blocksize` weights, either as float32 or, when nested
("double quantization", bitsandbytes' `compress_statistics`), as uint8 codes into the 8-bit
`nested_code` map, scaled per `nested_blocksize` codes by `nested_absmax` and shifted by `offset`
(the mean of the float32 absmax, removed before nesting so the 8-bit codes centre on zero).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Block sizes bitsandbytes accepts for 4-bit weights.
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare
class QuantState:
    """How to turn packed 4-bit codes back into a `dtype` tensor of `shape`."""

    quant_type: str                 # "nf4" or "fp4"
    code: torch.Tensor              # [16] float32: the 4-bit table ("quant_map")
    absmax: torch.Tensor            # [blocks] float32, or uint8 codes when nested
    shape: torch.Size
    dtype: torch.dtype              # dtype of the original weight, and of dequantization
    blocksize: int
    offset: float | None = None                 # nested only: added back after the 8-bit decode
    nested_absmax: torch.Tensor | None = None   # [ceil(blocks / nested_blocksize)] float32
    nested_code: torch.Tensor | None = None     # [256] float32: the 8-bit dynamic map
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def absmax_float(self) -> torch.Tensor:
        """The per-block scales as float32, undoing the nesting when there is one."""
        if not self.nested:
            return self.absmax.float()
        decoded = scale_blocks(self.nested_code[self.absmax.long()], self.nested_absmax, self.nested_blocksize)
        return decoded + self.offset

    def to(self, device: torch.device | str) -> QuantState:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, code=move(self.code), absmax=move(self.absmax),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))


def scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in float32 (the last block may be short)."""
    n = values.numel()
    padded = torch.nn.functional.pad(values, (0, -n % blocksize))
    return (padded.view(-1, blocksize) * scales.view(-1, 1)).view(-1)[:n]
