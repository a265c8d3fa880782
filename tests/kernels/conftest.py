"""Kernel tests: on a machine without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter. TRITON_INTERPRET must be set before the kernel modules are imported (Triton decides
at decoration time), which is why it is set here and the kernel modules import Triton lazily.
With a GPU the same tests run the compiled kernels on CUDA tensors."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    """The device the Triton path runs on here; on CPU, the Triton path is forced."""
    pytest.importorskip("triton")
    from velotune.kernels import force_triton

    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    with force_triton():
        yield torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

