"""Rotary embedding kernel (q and k together, partial rotary, packed positions) against the reference."""
import pytest
import torch

from velotune.kernels import apply_rope
from velotune.kernels.reference import apply_rope_reference

# Kernel (inputs in `dtype`) vs reference computed in float32 from the same inputs.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _cos_sin(positions: torch.Tensor, rot: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def _qk(batch, n_q, n_k, tokens, dim, dtype, device):
    # As the model makes them: [B, T, H, D] projections viewed as [B, H, T, D] (not contiguous).
    q = torch.randn(batch, tokens, n_q, dim).to(device, dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, tokens, n_k, dim).to(device, dtype).transpose(1, 2).requires_grad_()
    return q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens,dim,rot", [(1, 7, 16, 16), (3, 13, 18, 12), (3, 7, 32, 8)])
def test_rope_matches_reference(device, dtype, batch, tokens, dim, rot):
    q, k = _qk(batch, 4, 2, tokens, dim, dtype, device)
    positions = torch.randint(0, 4096, (batch, tokens))
    cos, sin = _cos_sin(positions, rot, dtype, device)
    qo, ko = apply_rope(q, k, cos, sin)
    assert type(qo.grad_fn).__name__ == "RopeFunctionBackward"
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward([qo, ko], [dq, dk])

    qr, kr = (t.detach().float().requires_grad_() for t in (q, k))
    qro, kro = apply_rope_reference(qr, kr, cos.float(), sin.float())
    torch.autograd.backward([qro, kro], [dq.float(), dk.float()])
    torch.testing.assert_close(qo.float(), qro, **TOL[dtype])
    torch.testing.assert_close(ko.float(), kro, **TOL[dtype])
    torch.testing.assert_close(q.grad.float(), qr.grad, **TOL[dtype])
    torch.testing.assert_close(k.grad.float(), kr.grad, **TOL[dtype])


def test_rope_in_place_without_autograd_and_packed_positions(device):
    # Two packed documents whose positions restart, and cos/sin shared over the batch ([1, T, R]).
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    cos, sin = _cos_sin(positions, 10, torch.float32, device)
    q, k = (t.detach() for t in _qk(2, 3, 1, 7, 14, torch.float32, device))
    expected_q, expected_k = apply_rope_reference(q, k, cos, sin)
    # The second document is rotated as if it stood alone at positions 0..2.
    alone_q, _ = apply_rope_reference(q[:, :, 4:], k[:, :, 4:], cos[:, :3], sin[:, :3])
    with torch.no_grad():
        qo, ko = apply_rope(q, k, cos, sin)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    torch.testing.assert_close(qo, expected_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, expected_k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(qo[:, :, 4:], alone_q, atol=1e-6, rtol=1e-6)

@pytest.mark.parametrize("rot,dim,message", [(7, 16, "must be even"), (20, 16, "<= head dim 16")])
def test_rope_rejects_bad_rotary_dim(device, rot, dim, message):
    q, k = _qk(1, 2, 2, 3, dim, torch.float32, device)
    cos = torch.ones(1, 3, rot, device=device)
    with pytest.raises(ValueError, match=message):
        apply_rope(q, k, cos, cos)
