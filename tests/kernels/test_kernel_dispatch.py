"""Which path runs: the reference on CPU by default, Triton only when forced or on CUDA, never when disabled."""
import importlib

import pytest
import torch

import velotune.kernels as kernels
from velotune.kernels import dispatch


@pytest.fixture
def restore_enabled():
    before = kernels.kernels_enabled()
    yield
    kernels.set_kernels_enabled(before)


def _all_ops(device="cpu"):
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    w = torch.ones(8, device=device, requires_grad=True)
    q = torch.randn(1, 2, 3, 8, device=device, requires_grad=True)
    cos = torch.ones(1, 3, 8, device=device)
    hidden = torch.randn(4, 8, device=device, requires_grad=True)
    return {
        "RMSNormFunctionBackward": kernels.rms_norm(x, w, 1e-6),
        "AddRMSNormFunctionBackward": kernels.add_rms_norm(x, x, w, 1e-6)[0],
        "RopeFunctionBackward": kernels.apply_rope(q, q, cos, cos)[0],
        "GLUFunctionBackward": kernels.glu(x, x, "silu"),
        "LinearCrossEntropyFunctionBackward": kernels.linear_cross_entropy(hidden, hidden, torch.arange(4, device=device))[0],
    }


def _paths(outputs: dict) -> set[str]:
    return {"triton" if type(out.grad_fn).__name__ == name else "reference" for name, out in outputs.items()}


def test_cpu_tensors_take_the_reference_by_default():
    assert not kernels.use_triton(torch.zeros(1))
    assert _paths(_all_ops()) == {"reference"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through Triton need the interpreter, set only without a GPU")
def test_force_triton_takes_the_kernels_and_disabling_wins(restore_enabled):
    pytest.importorskip("triton")
    with kernels.force_triton():
        assert _paths(_all_ops()) == {"triton"}
        kernels.set_kernels_enabled(False)
        assert not kernels.use_triton(torch.zeros(1))
        assert _paths(_all_ops()) == {"reference"}
    with pytest.raises(RuntimeError, match="kernels are disabled"):
        with kernels.force_triton():
            pass


@pytest.mark.gpu
def test_cuda_tensors_take_the_kernels(restore_enabled):
    assert _paths(_all_ops("cuda")) == {"triton"}
    kernels.set_kernels_enabled(False)
    assert _paths(_all_ops("cuda")) == {"reference"}


@pytest.mark.parametrize("value,enabled", [("0", False), ("off", False), ("1", True)])
def test_environment_variable_sets_the_default(monkeypatch, value, enabled):
    monkeypatch.setenv("VELOTUNE_KERNELS", value)
    try:
        importlib.reload(dispatch)
        assert kernels.kernels_enabled() is enabled
        # The functions exported by velotune.kernels read the reloaded module's state.
        assert kernels.use_triton(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "meta")) is (
            enabled and torch.cuda.is_available() and dispatch.triton_available())
    finally:
        monkeypatch.delenv("VELOTUNE_KERNELS")
        importlib.reload(dispatch)
