"""Kernel tests: on a machine without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter (the `device` fixture, tests/triton_device.py, loaded by tests/conftest.py); with a
GPU the same tests run the compiled kernels on CUDA tensors."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
