"""Quant tests: without CUDA, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, i.e. before
velotune.quant.dequant_triton is imported, hence here rather than in a fixture.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU when there is one, else the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
