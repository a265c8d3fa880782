"""How long a context trains on one GPU: GPU and host memory of a batch-1 step at long lengths, and
the longest sequence for which both fit (`velotune estimate --seq max`).

At long lengths velotune checkpoints every layer, places the checkpointed inputs by
`velotune.placement` (pinned host memory as far as it has room, the GPU for the rest), tiles the
MLP over the sequence (`models/tiled_mlp.py`) and chunks the loss, so what grows with the tokens on
the GPU is one layer's working set in the backward plus the inputs the plan keeps there. The
short-sequence estimator (`velotune.estimate`) puts the backward peak in the MLP; with the MLP
tiled it moves to the attention's backward, whose flash kernel makes a float32 dq accumulator and,
for grouped-query attention, dk and dv for every query head before summing them per key/value
head. Per token, 2 B = bf16, h hidden, q = heads x head_dim, kv = kv_heads x head_dim:

    attention backward of a recomputed layer (the peak for every dense model we ship):
        its input norm's output 2h; q, k, v after RoPE 2(q + 2kv); attention output 2q and
        log-sum-exp 4 B x heads; the residual-stream gradient 2h and the layer output's gradient
        2h; the attention output's gradient 2q; flash backward: dq accumulator 4 B x q, dq, dk, dv
        2(q + 2kv), and dk, dv on every query head 2 x 2q (grouped-query attention only);
        Qwen3's q/k norms 2(q + kv) + 4 B x (heads + kv_heads); norm rstd 8; LoRA X @ A 2 B x 7r
    MLP backward of a recomputed layer (tiled): the attention half's saved tensors above,
        x_mid and the MLP norm's output 2 x 2h, the incoming and outgoing gradients 2 x 2h, and
        one MLP chunk's gate, up and their gradients (fixed: chunk x 4 x 2 B x intermediate)
    end of the forward: the final norm's input and output, the gathered target rows, the loss's
        hidden-gradient buffer and one logits chunk, 5 x 2h (`velotune.estimate.model_terms`)
    every moment: RoPE cos and sin 2 x 2 x rotary_dim, each layer's h @ A_down (LoRA, 2 B x r)

    GPU peak = weights + gradients + optimizer states
               + max(moment) + max(inputs kept on the GPU, two host-parked layers in flight)
               + QLoRA's one dequantized projection
    host     = the placement's pinned bytes + HOST_PROCESS_GIB of the process itself

How it was checked: on an H100 (benchmarks/RESULTS.md, "Long-context training"), Llama-3.1-8B
QLoRA r16 with every input offloaded whole peaked at 33.9 GiB at 262,144 tokens and 43.4 GiB at
350,000; the formula gives 34.5 and 44.0 (+1.8%, +1.5%), and the measured slope (116.1 KB a
token) against 116.6 from the terms above. One term is inferred rather than traced: that the
layer output's gradient is still alive in the attention's backward (without it the terms give
108.4 KB a token, 7% under the measured slope); a profile of that moment on the GPU would settle it. The host side is exact by construction (the offloader
pins exact-size buffers); the process itself took 1.5 GiB beside them (max RSS 86.9 GiB with 85.4
GiB offloaded). Only dense layers with flash attention are modelled: Gemma 2's soft-capped
attention keeps [seq x seq] scores, and mixture-of-experts layers route per token in ways this
does not count, so those are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from velotune.estimate import BF16, F32, GIB, RESERVED_GIB, EstimateError, Setup, estimate, layer_kinds, model_terms
from velotune.memory_terms import Term
from velotune.models.config import ModelConfig
from velotune.models.offload import host_reserve_bytes
from velotune.models.tiled_mlp import mlp_chunk_size
from velotune.placement import Placement, plan_placement

HOST_PROCESS_GIB = 1.5   # the training process's own host memory beside the pinned checkpoints (measured)
LORA_FUSED_XA = 7        # X @ A products the fused LoRA blocks keep per layer (q/k/v, o, gate/up: 6, down: 1)


def _attention_half(config: ModelConfig) -> list[Term]:
    """What a recomputed layer keeps for its attention's backward (beside its input)."""
    h, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    q, kv = heads * config.head_dim, kv_heads * config.head_dim
    terms = [Term("input norm output: 2 B x h", BF16 * h),
             Term("q, k, v after RoPE: 2 B x (q + 2kv)", BF16 * (q + 2 * kv)),
             Term("attention output and log-sum-exp: 2 B x q + 4 B x heads", BF16 * q + F32 * heads),
             Term("norm rstd: 4 B x 2", F32 * 2)]
    if config.qk_norm:
        terms.append(Term("q and k before their norms, rstd: 2 B x (q + kv) + 4 B x (heads + kv_heads)",
                          BF16 * (q + kv) + F32 * (heads + kv_heads)))
    return terms


def attention_backward_terms(config: ModelConfig, setup: Setup) -> list[Term]:
    """Per-token bytes on the GPU in a recomputed layer's attention backward, its input excluded."""
    h, heads = config.hidden_size, config.num_attention_heads
    q, kv = heads * config.head_dim, config.num_key_value_heads * config.head_dim
    terms = [*_attention_half(config),
             Term("residual-stream gradient and the layer output's gradient: 2 x 2 B x h", 2 * BF16 * h),
             Term("attention output's gradient: 2 B x q", BF16 * q),
             Term("flash backward: float32 dq accumulator, dq, dk, dv: 4 B x q + 2 B x (q + 2kv)",
                  F32 * q + BF16 * (q + 2 * kv))]
    if kv < q:
        terms.append(Term("flash backward, grouped-query: dk and dv on every query head: 2 x 2 B x q", 2 * BF16 * q))
    if setup.method != "full":
        terms.append(Term("LoRA X @ A of the fused blocks: 2 B x 7r", BF16 * LORA_FUSED_XA * setup.lora_r))
    return terms


def mlp_backward_terms(config: ModelConfig, setup: Setup, chunk: int) -> list[Term]:
    """Per-token bytes in a recomputed layer's tiled MLP backward, its input excluded; the chunk's
    [chunk x intermediate] tensors are fixed bytes."""
    h, i = config.hidden_size, config.intermediate_size
    return [*_attention_half(config),
            Term("x_mid and the MLP norm output: 2 x 2 B x h", 2 * BF16 * h),
            Term("incoming and outgoing gradients: 2 x 2 B x h", 2 * BF16 * h),
            Term("one MLP chunk's gate, up and their gradients: chunk x 4 x 2 B x intermediate", 0,
                 4 * BF16 * i * chunk)]


@dataclass(frozen=True)
class ContextEstimate:
    """One length's estimate; bytes throughout."""

    seq: int
    resident: int              # weights, gradients, optimizer states
    activations: int           # at the peak: the moment's tensors and the checkpoints on the GPU
    moment: str                # when the peak is reached
    placement: Placement
    gpu_total: int
    gpu_budget: int
    host_total: int            # pinned checkpoints + the process
    host_budget: int

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_total <= self.gpu_budget

    @property
    def fits_host(self) -> bool:
        return self.host_total <= self.host_budget

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def why_not(self) -> str:
        """What runs out first, in words ('' when it fits)."""
        if not self.fits_gpu:
            kept = (f"{self.placement.kept_on_gpu} checkpoints kept on the GPU, the host being full"
                    if self.placement.kept_on_gpu else "every checkpoint in host memory")
            return f"GPU: {self.gpu_total / GIB:.1f} GiB needed of {self.gpu_budget / GIB:.1f} ({kept})"
        if not self.fits_host:
            return f"host: {self.host_total / GIB:.1f} GiB needed of {self.host_budget / GIB:.1f}"
        return ""


def _check_modelled(config: ModelConfig) -> None:
    if config.attn_logit_softcapping is not None:
        raise EstimateError("--seq max: soft-capped attention (Gemma 2) keeps [seq x seq] scores; "
                            "long contexts are modelled for flash attention only")
    if any(layer_kinds(config)):
        raise EstimateError("--seq max: mixture-of-experts layers are not modelled at long lengths yet")
    if config.attention_sinks:
        raise EstimateError("--seq max: attention sinks (gpt-oss) use a masked kernel; not modelled at long lengths")


def working_bytes(config: ModelConfig, setup: Setup, tokens: int) -> int:
    """The largest backward moment of a recomputed layer at `tokens` tokens, its checkpointed
    inputs excluded: what the placement must leave room for on the GPU."""
    chunk = mlp_chunk_size(None, tokens) or tokens
    return max(sum(t.bytes(tokens) for t in attention_backward_terms(config, setup)),
               sum(t.bytes(tokens) for t in mlp_backward_terms(config, setup, chunk)))


def host_budget_bytes(host_gib: float) -> int:
    """Host memory the pinned checkpoints and the process may take, of `host_gib` available."""
    total = int(host_gib * GIB)
    return total - host_reserve_bytes(total)


def context_estimate(config: ModelConfig, setup: Setup, seq: int, gpu_gib: float, host_gib: float,
                     kept_on_gpu: int | str = "auto", keep_attention: bool = True) -> ContextEstimate:
    """GPU and host memory of one batch-1 step of `seq` tokens with offloaded checkpoints, on a
    GPU of `gpu_gib` (RESERVED_GIB kept for the CUDA context) and `host_gib` of available host
    memory (MemAvailable); `kept_on_gpu` and `keep_attention` as the model's settings
    (`velotune.placement.plan_placement`)."""
    _check_modelled(config)
    setup = replace(setup, batch=1, seq=seq, checkpointing=True)
    tokens, L = seq, config.num_hidden_layers
    est = estimate(config, setup)
    resident = est.weights + est.gradients + est.optimizer
    host_budget = host_budget_bytes(host_gib)
    process = int(HOST_PROCESS_GIB * GIB)
    gpu_budget = int((gpu_gib - RESERVED_GIB) * GIB)
    gpu_room = gpu_budget - resident - working_bytes(config, setup, tokens) - 2 * BF16 * config.hidden_size * tokens
    placement = plan_placement(config, tokens, BF16, L, offload=True, host_room=host_budget - process,
                               kept_on_gpu=kept_on_gpu, gpu_room=gpu_room, keep_attention=keep_attention)
    chunk = mlp_chunk_size(None, tokens) or tokens
    everywhere = Term("RoPE cos and sin: 2 x 2 B x rotary_dim", BF16 * 2 * config.rotary_dim).bytes(tokens)
    if setup.method != "full":
        everywhere += L * BF16 * setup.lora_r * tokens          # each layer's h @ A_down
    moments = {
        "attention backward": sum(t.bytes(tokens) for t in attention_backward_terms(config, setup)),
        "MLP backward": sum(t.bytes(tokens) for t in mlp_backward_terms(config, setup, chunk)),
    }
    moment = max(moments, key=moments.__getitem__)
    dequantized = sum(t.fixed for t in model_terms(config, setup) if "dequantized" in t.what)
    peaks = {moment: moments[moment] + max(placement.gpu_bytes, placement.in_flight_bytes) + dequantized,
             # the loss, the inputs kept on the GPU, and the last input still being copied out
             "end of the forward": sum(t.bytes(tokens) for t in model_terms(config, setup))
             + placement.gpu_bytes + BF16 * config.hidden_size * tokens}
    moment = max(peaks, key=peaks.__getitem__)
    return ContextEstimate(seq=seq, resident=resident, activations=peaks[moment] + everywhere, moment=moment,
                           placement=placement, gpu_total=resident + peaks[moment] + everywhere,
                           gpu_budget=gpu_budget,
                           host_total=placement.host_bytes + process, host_budget=host_budget)


def longest_context(config: ModelConfig, setup: Setup, gpu_gib: float, host_gib: float,
                    kept_on_gpu: int | str = "auto",
                    keep_attention: bool = True) -> tuple[ContextEstimate | None, ContextEstimate]:
    """(the longest batch-1 length that fits, the next length, which does not). The first is None
    when not even one token fits. The model's max_position_embeddings is no bound here: long-context
    training extends the positions (RoPE scaling), and memory always runs out."""
    if gpu_gib <= RESERVED_GIB:
        raise EstimateError(f"gpu-gib must exceed the {RESERVED_GIB} GiB kept for the CUDA context, got {gpu_gib}")
    at = lambda n: context_estimate(config, setup, n, gpu_gib, host_gib, kept_on_gpu, keep_attention)  # noqa: E731
    if not at(1).fits:
        return None, at(1)
    lo, hi = 1, 2
    while at(hi).fits:         # memory grows with the length, so this ends
        lo, hi = hi, hi * 2
    while hi - lo > 1:         # at(lo) fits, at(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid).fits else (lo, mid)
    return at(lo), at(hi)


def kv_cache_per_token(config: ModelConfig) -> int:
    """Bytes of keys and values one token takes in the generation engine's cache, every layer (bf16)."""
    return 2 * BF16 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim


@dataclass(frozen=True)
class GRPOEstimate:
    """GRPO with long completions: the generation phase (KV cache for `generation_batch` rows of
    prompt + completion) and the update (one completion per micro-batch, as `context_estimate`);
    they take turns, so each must fit on its own."""

    completion: int
    generation_batch: int
    generation_gpu: int
    training: ContextEstimate

    @property
    def fits_generation(self) -> bool:
        return self.generation_gpu <= self.training.gpu_budget

    @property
    def fits(self) -> bool:
        return self.fits_generation and self.training.fits

    def why_not(self) -> str:
        if not self.fits_generation:
            return (f"generation: the KV cache of {self.generation_batch} rows needs {self.generation_gpu / GIB:.1f} "
                    f"GiB of {self.training.gpu_budget / GIB:.1f}")
        return f"update: {self.training.why_not()}" if not self.training.fits else ""


def grpo_estimate(config: ModelConfig, setup: Setup, prompt: int, completion: int, generation_batch: int,
                  gpu_gib: float, host_gib: float) -> GRPOEstimate:
    """Both GRPO phases at one completion length. Generation: the weights, the adapters with their
    gradients and optimizer states (alive throughout), and the cache; the decode step's logits
    (float32, [rows x vocab]) and its mask ([rows x span], span the next power of two) beside it.
    Update: one row of prompt + completion tokens with offloaded checkpoints (`context_estimate`)."""
    training = context_estimate(config, setup, prompt + completion, gpu_gib, host_gib)
    length = prompt + completion
    span = 1 << max(length - 1, 1).bit_length()
    generation = (training.resident + generation_batch * length * kv_cache_per_token(config)
                  + generation_batch * (2 * F32 * config.vocab_size + span))
    return GRPOEstimate(completion, generation_batch, generation, training)


def grpo_longest_completion(config: ModelConfig, setup: Setup, prompt: int, generation_batch: int, gpu_gib: float,
                            host_gib: float) -> tuple[GRPOEstimate | None, GRPOEstimate]:
    """(the longest completion both GRPO phases fit, the next length, which does not)."""
    _check_modelled(config)
    at = lambda n: grpo_estimate(config, setup, prompt, n, generation_batch, gpu_gib, host_gib)  # noqa: E731
    if not at(1).fits:
        return None, at(1)
    lo, hi = 1, 2
    while at(hi).fits:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid).fits else (lo, mid)
    return at(lo), at(hi)
