"""The device for tests of the Triton path: CUDA with the compiled kernels when there is a GPU;
otherwise the CPU, the kernels running through Triton's interpreter. TRITON_INTERPRET must be set
before the kernel modules are imported (Triton decides at decoration time), which importing this
module does on a machine without a GPU; the kernel modules import Triton lazily."""
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
