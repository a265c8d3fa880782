"""Shared pytest set-up: GPU tests skip without CUDA; tests never reach a hub."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The `device` fixture of Triton-path tests (CUDA, or the CPU with the kernels interpreted); loading
# it sets TRITON_INTERPRET on a machine without a GPU before any kernel module is imported.
pytest_plugins = ["tests.triton_device"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's tokenizer, rebuilt from its GGUF (loaded once per test session)."""
    import gguf

    from velotune.loaders import default_model_path
    from velotune.tokenizer import Tokenizer

    path = default_model_path()
    return Tokenizer.from_gguf(gguf.GGUFReader(str(path)), str(path))


ONE_THREAD_DIRS = {"train", "cli", "distributed"}


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tests of tiny models (train/, cli/, distributed/) run fastest on one thread: their ops are
    too small to split, and on a shared CPU extra threads mostly wait for each other. Restored
    after each test."""
    if request.path.parent.name not in ONE_THREAD_DIRS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
