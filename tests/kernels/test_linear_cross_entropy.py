"""Fused linear + cross-entropy: loss and gradients against the full-logits reference, and the
property it exists for (no [N, V] tensor is ever created)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from velotune.kernels import linear_cross_entropy
from velotune.kernels.ops.linear_cross_entropy import default_chunk_size, linear_cross_entropy_triton
from tests.live_storages import LiveStorages
from velotune.kernels.reference import linear_cross_entropy_reference

# Kernel (inputs in `dtype`) vs reference computed in float32 from the same inputs. The loss is a
# sum over tokens, so its tolerance is relative.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=3e-2),
}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
N, H, V = 13, 67, 97


def _inputs(dtype, device, n=N, ignored=(3, 7)):
    hidden = torch.randn(n, H).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H) * 0.3).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (n,))
    labels[list(ignored)] = -100
    return hidden, weight, labels.to(device)


def _reference_grads(hidden, weight, labels, softcap, grad_scale):
    hr, wr = (t.detach().float().requires_grad_() for t in (hidden, weight))
    loss, count = linear_cross_entropy_reference(hr, wr, labels, softcap=softcap)
    (loss * grad_scale).backward()
    return loss, count, hr.grad, wr.grad


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_size", [None, 4, N])
def test_linear_cross_entropy_matches_reference(device, dtype, softcap, chunk_size):
    hidden, weight, labels = _inputs(dtype, device)
    loss, count = linear_cross_entropy_triton(hidden, weight, labels, softcap=softcap, chunk_size=chunk_size)
    assert type(loss.grad_fn).__name__ == "LinearCrossEntropyFunctionBackward"
    (loss * 0.25).backward()  # the backward scales the stored gradients by the incoming one
    ref_loss, ref_count, ref_dh, ref_dw = _reference_grads(hidden, weight, labels, softcap, 0.25)
    assert count.item() == ref_count.item() == N - 2
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(hidden.grad.float(), ref_dh, **TOL[dtype])
    torch.testing.assert_close(weight.grad.float(), ref_dw, **TOL[dtype])
    assert hidden.grad[3].abs().max().item() == 0.0  # ignored tokens get no gradient


def test_linear_cross_entropy_frozen_head_and_no_grad(device):
    hidden, weight, labels = _inputs(torch.float32, device)
    weight = weight.detach()  # a frozen output head (LoRA): only the hidden gradient is computed
    loss, _ = linear_cross_entropy(hidden, weight, labels, softcap=30.0)
    loss.backward()
    ref_loss, _, ref_dh, _ = _reference_grads(hidden, weight, labels, 30.0, 1.0)
    torch.testing.assert_close(hidden.grad, ref_dh, **TOL[torch.float32])
    with torch.no_grad():
        eval_loss, eval_count = linear_cross_entropy(hidden, weight, labels, softcap=30.0)
    torch.testing.assert_close(eval_loss, ref_loss, **TOL[torch.float32])
    assert eval_count.item() == N - 2


def test_linear_cross_entropy_all_ignored(device):
    hidden, weight, labels = _inputs(torch.float32, device, n=3, ignored=(0, 1, 2))
    loss, count = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert hidden.grad.abs().max().item() == 0.0 and weight.grad.abs().max().item() == 0.0


class _LargestTensor(TorchDispatchMode):
    """Records the largest element count among the floating-point outputs of every PyTorch op
    (Triton's interpreter moves kernel arguments as byte tensors: those are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def test_linear_cross_entropy_never_materialises_full_logits(device):
    n, vocab, hidden_size = 64, 512, 8
    hidden = torch.randn(n, hidden_size, device=device, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), device=device)
    with _LargestTensor() as seen:
        loss, _ = linear_cross_entropy_triton(hidden, weight, labels, chunk_size=4)
        loss.backward()
    # Chunks of 4 tokens make [4, V] logits; the weight gradient [V, H] is the largest tensor,
    # far below the [N, V] = 32768 elements of the full logits.
    assert seen.largest == vocab * hidden_size
    ref_loss, _, _, _ = _reference_grads(hidden, weight, labels, None, 1.0)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])


def test_one_logits_buffer_serves_every_chunk(device):
    # 7 chunks of 4 tokens and a partial one: a fresh [4, V] result per chunk would hold the last
    # chunk's logits while the next is computed (two chunks at the peak).
    hidden, weight, labels = _inputs(torch.float32, device, n=30, ignored=())
    with LiveStorages(lambda shape: len(shape) == 2 and shape[1] == V, ignore=(weight,)) as seen:
        loss, _ = linear_cross_entropy_triton(hidden, weight.detach(), labels, chunk_size=4)
    assert seen.most == 1
    torch.testing.assert_close(loss, _reference_grads(hidden, weight, labels, None, 1.0)[0], **TOL[torch.float32])


def test_default_chunk_holds_about_256_mib_of_logits():
    assert default_chunk_size(128256, 2) == 1024  # Llama 3, bf16
    assert default_chunk_size(256000, 2) == 512  # Gemma 2, bf16
    assert default_chunk_size(49152, 4) == 1280  # SmolLM2, float32
    assert default_chunk_size(2**30, 4) == 1  # a vocabulary too large for one row still gets a row


def test_linear_cross_entropy_rejects_bad_labels(device):
    hidden, weight, labels = _inputs(torch.float32, device)
    labels[0] = V
    with pytest.raises(ValueError, match=f"label {V} is outside the vocabulary"):
        linear_cross_entropy(hidden, weight, labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:5])
