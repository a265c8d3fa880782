"""The experts of a mixture-of-experts layer as grouped Triton GEMMs with a hand-written backward.

Forward, for x [N, H] and each token's k (expert, weight) choices, R = N * k sorted rows:
  1. sort the choices by expert (`route_plan`: argsort, counts, tile table; no host sync);
  2. gu = x[token] @ W_gate_up[e]^T (+ bias): the gather is folded into the GEMM's loads;
  3. h = act(gate) * up (an elementwise kernel over gu's two halves);
  4. o = (h @ W_down[e]^T + bias) * w: the routing weight is the GEMM's epilogue;
  5. y[t] = sum_j o[row of (t, j)]: a gather-sum (no atomics, so deterministic).
Per-expert LoRA adds s (X A_e^T) B_e^T to either projection: the rank-r product is written first
and the base GEMM accumulates onto it (beta = 1).

Saved: x, the plan, gu [R, 2I] and the small X A^T products. h is recomputed in the backward from
gu (one elementwise pass) instead of being kept ([R, I] per layer). The routing weight's gradient
is <dy[t], o_unweighted> = <dh_unweighted, h>, so o is never kept either.

Backward (dy [N, H]): dh_u = dy[token] @ W_down[e] (+ LoRA); dw = rowsum(dh_u * h); dh = w dh_u;
dgu = GLU'(dh); dx_rows = dgu @ W_gate_up[e] (+ LoRA); dx[t] = sum_j dx_rows[row of (t, j)].
Weight gradients (full fine-tuning, biases, LoRA A and B) come from `grouped_weight_grad`, only for
the tensors that need them (frozen 16-bit or 4-bit experts under QLoRA get none).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels.moe_reference import SWIGLU_ALPHA, SWIGLU_LIMIT, ExpertAdapters, Experts
from velotune.kernels.ops.glu import _activation_and_slope
from velotune.kernels.ops.grouped_gemm import RoutePlan, grouped_mm, grouped_weight_grad, route_plan
from velotune.kernels.ops.launch import on_device

ACT_IDS = {"silu": 0, "gelu_pytorch_tanh": 1, "swiglu_clamped": 2}
_BLOCK = 1024


@triton.jit
def _clamped_swiglu(g, u, alpha, limit):
    """gpt-oss: (h, dh/dg, dh/du) with h = (clamp(u, -L, L) + 1) * g' sigmoid(alpha g'), g' = min(g, L)."""
    gc = tl.minimum(g, limit)
    uc = tl.minimum(tl.maximum(u, -limit), limit)
    s = tl.sigmoid(alpha * gc)
    swish = gc * s
    dswish = s + alpha * gc * s * (1.0 - s)
    dg = tl.where(g <= limit, (uc + 1.0) * dswish, 0.0)
    du = tl.where((u >= -limit) & (u <= limit), swish, 0.0)
    return (uc + 1.0) * swish, dg, du


@triton.jit
def _glu_kernel(GU, DH, H, DGU, n, inter, alpha, limit, ACT: tl.constexpr, BACKWARD: tl.constexpr,
                BLOCK: tl.constexpr):
    """Over [rows, inter] elements: forward writes h; backward writes dgu [rows, 2 * inter] from dh."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    row, col = offs // inter, offs % inter
    g = tl.load(GU + row * 2 * inter + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * inter + inter + col, mask=ok, other=0.0).to(tl.float32)
    if ACT == 2:
        h, dg, du = _clamped_swiglu(g, u, alpha, limit)
    else:
        act, slope = _activation_and_slope(g, ACT == 1)
        h, dg, du = act * u, slope * u, act
    if BACKWARD:
        dh = tl.load(DH + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(DGU + row * 2 * inter + col, (dh * dg).to(DGU.dtype.element_ty), mask=ok)
        tl.store(DGU + row * 2 * inter + inter + col, (dh * du).to(DGU.dtype.element_ty), mask=ok)
    else:
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=ok)


def _glu(gu: torch.Tensor, activation: str, dh: torch.Tensor | None = None) -> torch.Tensor:
    rows, inter = gu.shape[0], gu.shape[1] // 2
    out = gu.new_empty(rows, inter) if dh is None else torch.empty_like(gu)
    n = rows * inter
    with on_device(gu):
        _glu_kernel[(triton.cdiv(n, _BLOCK),)](gu, dh if dh is not None else out, out, out, n, inter,
                                               SWIGLU_ALPHA, SWIGLU_LIMIT,
                                               ACT=ACT_IDS[activation], BACKWARD=dh is not None, BLOCK=_BLOCK)
    return out


def _block_m(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 16


def _lora_first(a: torch.Tensor, lora: ExpertAdapters | None, plan: RoutePlan, gather: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(a A^T, s (a A^T) B^T) of an adapted projection, the second to be accumulated onto."""
    if lora is None:
        return None, None
    xa = grouped_mm(a, lora.a.to(a.dtype), plan, gather=gather)
    return xa, grouped_mm(xa, lora.b.to(a.dtype), plan, alpha=lora.scale)


class MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts,  # type: ignore[override]
                *params: torch.Tensor | None) -> torch.Tensor:
        n, k = expert_ids.shape
        gate_up, down = experts.weights()
        plan = route_plan(expert_ids, gate_up.shape[0], _block_m(x.device))
        w_rows = weights.reshape(-1)[plan.order].float().contiguous()
        gu_lora = experts.gate_up_lora
        xa, gu = _lora_first(x, gu_lora, plan, True)
        gu = grouped_mm(x, gate_up.to(x.dtype), plan, gather=True, bias=experts.gate_up_bias, out=gu)
        h = _glu(gu, experts.activation)
        ha, o = _lora_first(h, experts.down_lora, plan, False)
        o = grouped_mm(h, down.to(x.dtype), plan, bias=experts.down_bias, out=o, row_scale=w_rows)
        del gate_up, down
        ctx.experts, ctx.plan, ctx.shape = experts, plan, (n, k)
        ctx.save_for_backward(x, weights, w_rows, gu, xa, ha)
        return o[plan.inverse].view(n, k, -1).sum(1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weights, w_rows, gu, xa, ha = ctx.saved_tensors
        experts: Experts = ctx.experts
        plan: RoutePlan = ctx.plan
        n, k = ctx.shape
        gate_up, down = experts.weights()   # 4-bit experts: dequantized again, not kept from the forward
        num_experts = gate_up.shape[0]
        dy = dy.contiguous().to(x.dtype)
        needs = ctx.needs_input_grad
        p_gu, p_down, p_gub, p_db, p_a1, p_b1, p_a2, p_b2 = needs[4:12]
        grads: list[torch.Tensor | None] = [None] * 8
        h = _glu(gu, experts.activation)
        down_lora, gu_lora = experts.down_lora, experts.gate_up_lora

        # down projection, unweighted (the routing weight's gradient needs it)
        dha = None
        if down_lora is not None:
            dha = grouped_mm(dy, down_lora.b.to(x.dtype), plan, transpose=False, gather=True, alpha=down_lora.scale)
        dh = grouped_mm(dha, down_lora.a.to(x.dtype), plan, transpose=False) if dha is not None else None
        dh = grouped_mm(dy, down.to(x.dtype), plan, transpose=False, gather=True, out=dh)
        dw_rows = (dh.float() * h.float()).sum(-1)
        if experts.down_bias is not None:   # the bias is part of the output the weight scales
            dw_rows += (dy[plan.token.long()].float() * experts.down_bias[plan.expert].float()).sum(-1)
        d_weights = torch.empty_like(dw_rows)
        d_weights[plan.order] = dw_rows
        if p_down or p_db or p_b2 or p_a2:
            dyw = (dy[plan.token.long()].float() * w_rows[:, None]).to(x.dtype)
            if p_down:
                grads[1] = grouped_weight_grad(dyw, h, plan, num_experts, dtype=down.dtype)
            if p_db:
                grads[3] = dyw.new_zeros(num_experts, dyw.shape[1], dtype=torch.float32).index_add_(
                    0, plan.expert, dyw.float()).to(experts.down_bias.dtype)
            if p_b2:
                grads[7] = grouped_weight_grad(dyw, ha, plan, num_experts, alpha=down_lora.scale,
                                               dtype=down_lora.b.dtype)
            if p_a2:
                grads[6] = grouped_weight_grad((dha.float() * w_rows[:, None]).to(x.dtype), h, plan, num_experts,
                                               dtype=down_lora.a.dtype)
        dh = (dh.float() * w_rows[:, None]).to(x.dtype)
        dgu = _glu(gu, experts.activation, dh)
        del dh, h

        # gate/up projection
        dxa = None
        if gu_lora is not None:
            dxa = grouped_mm(dgu, gu_lora.b.to(x.dtype), plan, transpose=False, alpha=gu_lora.scale)
        dx_rows = grouped_mm(dxa, gu_lora.a.to(x.dtype), plan, transpose=False) if dxa is not None else None
        dx_rows = grouped_mm(dgu, gate_up.to(x.dtype), plan, transpose=False, out=dx_rows)
        del gate_up, down
        dx = dx_rows[plan.inverse].view(n, k, -1).sum(1)
        if p_gu:
            grads[0] = grouped_weight_grad(dgu, x, plan, num_experts, gather=True, dtype=x.dtype)
        if p_gub:
            grads[2] = dgu.new_zeros(num_experts, dgu.shape[1], dtype=torch.float32).index_add_(
                0, plan.expert, dgu.float()).to(experts.gate_up_bias.dtype)
        if p_b1:
            grads[5] = grouped_weight_grad(dgu, xa, plan, num_experts, alpha=gu_lora.scale, dtype=gu_lora.b.dtype)
        if p_a1:
            grads[4] = grouped_weight_grad(dxa, x, plan, num_experts, gather=True, dtype=gu_lora.a.dtype)
        return (dx, None, d_weights.view(n, k).to(weights.dtype), None, *grads)


def moe_experts_triton(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                       experts: Experts) -> torch.Tensor:
    x = x.contiguous()
    gl, dl = experts.gate_up_lora, experts.down_lora
    params = (experts.gate_up, experts.down, experts.gate_up_bias, experts.down_bias,
              gl.a if gl else None, gl.b if gl else None, dl.a if dl else None, dl.b if dl else None)
    return MoEExperts.apply(x, expert_ids, weights, experts, *params)
