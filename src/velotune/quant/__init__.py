"""4-bit weights (NF4/FP4) in bitsandbytes' layout: quantization, dequantization, checkpoints,
and the frozen `Linear4bit` layer that QLoRA wraps."""
from velotune.quant.linear4bit import Linear4bit
from velotune.quant.model import quantize_linears
from velotune.quant.nf4 import dequantize_nf4, quantize_nf4
from velotune.quant.serialization import QuantFormatError, state_from_tensors, state_to_tensors
from velotune.quant.state import QuantState

__all__ = [
    "Linear4bit", "QuantFormatError", "QuantState", "dequantize_nf4", "quantize_linears", "quantize_nf4",
    "state_from_tensors", "state_to_tensors",
]
