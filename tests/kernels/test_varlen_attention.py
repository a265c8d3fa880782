"""Attention over packed documents (kernels.varlen_attention): the reference against explicit
masked attention on the CPU, and PyTorch's variable-length flash kernel against the reference on
a GPU (half precision, grouped-query heads, sliding windows, empty documents, a loose length
bound, and inside a CUDA graph)."""
import pytest
import torch

from velotune.kernels import varlen_attention
from velotune.kernels.reference import varlen_attention_reference


def explicit(q, k, v, lengths, scale, window=None, causal=True):
    """Softmax over an explicit [N x N] mask: same document, not after the query (causal), within the window."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = torch.arange(q.shape[0])
    allowed = (doc[:, None] == doc[None, :]) & ((index[None, :] <= index[:, None]) | (not causal))
    if window is not None:
        allowed &= index[:, None] - index[None, :] < window
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, vv)


def inputs(lengths, heads=6, kv_heads=2, dim=16, dtype=torch.float32, device="cpu"):
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, dim, device=device, dtype=dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, offsets


@pytest.mark.parametrize("lengths,window", [([5, 1, 9], None), ([7, 0, 4, 0], None), ([12, 3], 4), ([1], None)])
def test_reference_equals_explicit_masked_attention(lengths, window):
    torch.manual_seed(0)
    q, k, v, offsets = inputs(lengths, dtype=torch.float64)
    out = varlen_attention_reference(q, k, v, offsets, 0.3, window)
    want = explicit(q, k, v, lengths, 0.3, window)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    wants = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("lengths", [[5, 1, 9], [7, 0, 4, 0], [64, 16, 64, 3]])
def test_two_way_reference_equals_explicit_masked_attention(lengths):
    """causal=False (a vision tower's images and windows): every token of a segment sees all of it."""
    torch.manual_seed(2)
    q, k, v, offsets = inputs(lengths, dtype=torch.float64)
    out = varlen_attention(q, k, v, offsets, max(lengths), 0.3, causal=False)
    want = explicit(q, k, v, lengths, 0.3, causal=False)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    wants = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w)
    assert (out - varlen_attention(q, k, v, offsets, max(lengths), 0.3)).abs().max() > 1e-3


def test_reference_refuses_offsets_that_miss_tokens():
    q, k, v, offsets = inputs([3, 4])
    with pytest.raises(ValueError, match="run from 0 to the 7 tokens"):
        varlen_attention_reference(q, k, v, offsets[:-1], 0.25)


def test_cpu_dispatch_takes_the_reference():
    torch.manual_seed(1)
    q, k, v, offsets = inputs([4, 6])
    torch.testing.assert_close(varlen_attention(q, k, v, offsets, 6, 0.25),
                               varlen_attention_reference(q, k, v, offsets, 0.25))


def assert_flash_matches_reference(q, k, v, offsets, max_len: int, scale: float, **options) -> None:
    """The GPU flash path (forward and the q/k/v gradients) against the float32 reference."""
    out = varlen_attention(q, k, v, offsets, max_len, scale, **options)
    assert type(out.grad_fn).__name__ == "VarlenFlashAttentionBackward"
    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = varlen_attention_reference(*ref, offsets, scale, **options)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    wants = torch.autograd.grad(want, ref, dout.float())
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), want, **tol)
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g.float(), w, **tol)


GPU_CASES = [([37, 1, 130, 64], None, 130), ([300, 0, 45, 0, 0], None, 512), ([200, 57], 64, 256),
             ([1000, 24], None, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths,window,max_len", GPU_CASES)
def test_flash_matches_reference(dtype, lengths, window, max_len):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    q, k, v, offsets = inputs(lengths, heads=8, kv_heads=2, dim=64, dtype=dtype, device="cuda")
    assert_flash_matches_reference(q, k, v, offsets, max_len, 0.125, window=window)


@pytest.mark.gpu
def test_flash_replays_inside_a_cuda_graph_with_new_offsets():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    q, k, v, offsets = inputs([100, 28, 0, 0], heads=8, kv_heads=2, dim=64, dtype=torch.bfloat16, device="cuda")
    static = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm-up outside the capture
        varlen_attention(*static, offsets, 128, 0.125).float().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = varlen_attention(*static, offsets, 128, 0.125)
        out.float().square().sum().backward()
    offsets.copy_(torch.tensor([0, 60, 90, 127, 128], dtype=torch.int32))   # other documents, same shape
    for x in static:
        x.grad.zero_()
    graph.replay()
    want = varlen_attention_reference(*[x.detach().float() for x in static], offsets, 0.125)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[64, 64, 16, 256, 3], [1024, 80]])
def test_two_way_flash_matches_reference(lengths):
    """Qwen2.5-VL's tower: 16 heads of 80, windows of 64 patches and whole images, in bf16."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    q, k, v, offsets = inputs(lengths, heads=16, kv_heads=16, dim=80, dtype=torch.bfloat16, device="cuda")
    assert_flash_matches_reference(q, k, v, offsets, max(lengths), 80 ** -0.5, causal=False)
