"""GPU memory estimate for fine-tuning a model with velotune, from its config alone.

Every number is bytes, computed from shapes; GiB = 2^30 bytes. The estimate is the peak that
`torch.cuda.max_memory_allocated` reports (no CUDA context, no allocator slack). Weights and
optimizer states live throughout; activations and gradients take turns, so the rest of the peak
is the largest of three moments (symbols below):

    total = weights + optimizer states + max(forward end, backward start, backward end)
    forward end    = S + W                       (checkpointing: S + max(W, one recomputed layer))
    backward start = S + head gradient + Tmp     (checkpointing: + one recomputed layer)
    backward end   = max(gradients - embedding gradient + one layer + Tmp, gradients)

Weights. full, lora: every parameter in bf16 (2 B). qlora: the attention and MLP projection
matrices in bitsandbytes' NF4 layout (ceil(n/2) code bytes + one uint8 absmax per 64 + one
float32 per 256 absmax + the 16- and 256-entry float32 tables); embeddings, head, norms and
biases stay bf16. LoRA adapters (lora, qlora) are float32: A [r, in] and B [out, r] on all seven
projections (q, k, v, o, gate, up, down) of every layer.

Embeddings in host memory (`offload_embeddings`, LoRA and QLoRA of untied models): the input
embedding table (2 B x V x h) is counted on the host, not the GPU; each step's rows reach the GPU
as the first layer's input, which the activations already count.

Gradients: bf16 for a full fine-tune (2 B per parameter), float32 for adapters (4 B).
Optimizer: AdamW keeps two float32 moments (8 B per trainable parameter); 8-bit AdamW
(torchao's AdamW8bit, what `optimizer: adamw8bit` trains with) keeps, per trainable tensor of n
elements, two uint8 moments, one float32 scale per 256 values for each, and a 256-entry float32
code table for each (2 n + 8 n / 256 + 2 KiB), but only for a tensor of at least 4,096 elements
that is a whole number of 256-value blocks; any other keeps its two moments in the parameter's
dtype, counted as float32 (adapters are float32; a full fine-tune's AdamW moments are counted as
float32 too). tests/train/test_optim_8bit.py measures these bytes on the real optimizer. Both are
assumed fused (no step temporaries), so the optimizer step never exceeds the backward peak.

Activations at the end of the forward pass, T = batch x seq tokens, everything bf16 (2 B) unless
marked f32 (4 B), h hidden, q = heads x head_dim, kv = kv_heads x head_dim, i intermediate,
H heads, r the LoRA rank. What the decoder keeps for backward with the fused kernels (RMSNorm saves
its input and a f32 rstd per row, the GLU kernel saves gate and up and the down projection its
input act(gate) * up, RoPE saves only cos/sin, SDPA flash attention saves q, k, v, its output and a
f32 log-sum-exp per head). LoRA and QLoRA run the fused blocks of `lora.fused`: the frozen or 4-bit
base saves nothing, each block saves its input once (the norm's output, the same tensor), its
X @ A and bf16 copies of its adapters' A and B; the MLP block keeps gate and up but not
act(gate) * up, which it makes one row chunk at a time (and again in the backward), and keeps
h @ A_down as a ctx attribute:

    full:       per layer = T x [ 2 B x (x + norm1 + q + k + v + attn_out + x_mid + norm2 + gate + up + act)
                                  + 4 B x (2 rstd + H lse) ]
                          = T x [ 2 B x (4h + 2q + 2kv + 3i) + 4 B x (2 + H) ]        (Llama family)
    LoRA/QLoRA: per layer = T x [ 2 B x (4h + 2q + 2kv + 2i + 7r) + 4 B x (2 + H) ]
                            + 2 B x r x sum(in + out) of the seven projections (the A and B copies)
      where 7r = X @ A of the q/k/v, o, gate/up blocks (6r) + h @ A_down (r)
    + Qwen3 q/k norms: 2 B x (q + kv) + 4 B x (H + kv_heads)
    + Gemma 2 sandwich norms: 2 B x 2h + 4 B x 2; its soft-capped attention is explicit, saving k
      and v repeated to H heads (2 B x 2(q - kv)), tanh(scores) bf16, softmax f32 and probabilities
      bf16 (8 B x batch x H x seq^2) and the causal mask (1 B x seq^2), and no log-sum-exp

    S, saved:  no checkpointing L x per layer; checkpointing L x 2 B x T x h (layer inputs), and
        for LoRA/QLoRA L x 2 B x T x r (h @ A_down: the graph of the checkpointed forward holds it
        outside the saved tensors, which torch's checkpoint drops)
    one recomputed layer = per layer, less LoRA's h @ A_down: a checkpoint's recomputation asks the
        MLP for no output (`checkpointing.recomputing()`), so the fused MLP makes no h at all
    W, model-wide at the end of the forward pass = RoPE cos and sin (2 B x 2 T x rotary_dim) + final
        norm input, its output, the gathered target rows, the loss's hidden-gradient buffer and one
        chunk of logits sized like the hidden states (2 B x 5 T h) + final norm rstd (4 B x T); a
        full fine-tune adds the head gradient, which the fused loss computes in the forward pass: a
        float32 accumulator and its bf16 rounding (6 B x V x h); QLoRA one dequantized projection
        (2 B x largest out x in)
    Tmp, what one layer's backward adds at its peak, in the MLP's backward with every saved tensor
        of the layer still alive. full: the gradients of the layer output, the MLP input, act,
        gate and up, 2 B x T x (2h + 2i). LoRA/QLoRA: the layer output's gradient 2 B x T x h,
        then one dh chunk (rows x i, at most 64 MiB, `lora.fused._row_chunks`) or, once that is
        freed, the MLP input's gradient 2 B x T x h, whichever is larger (dg and du overwrite g
        and u); QLoRA adds one dequantized projection. Explicit attention (Gemma 2) adds the
        float32 gradient of the scores, 4 B x batch x H x seq^2
    The head gradient (2 B x V x h) exists from the forward pass on; the embedding gradient (an
    untied, trained embedding) only after the last layer's backward.

Mixture-of-experts layers (Qwen3-MoE, gpt-oss) replace the MLP's terms by their router's and
grouped experts' (velotune.estimate_experts: routed gate|up rows 2 B x 2I x k, the route plan,
which a checkpointed layer keeps too, the router's probabilities; their backward's peak; a 4-bit
layer's experts dequantized whole, 2 B x 3 E I h, instead of one projection), their adapters are
per expert, and only q/k/v/o go through the fused LoRA blocks. A model with dense and MoE layers
sums them layer by layer. gpt-oss's attention sinks pad q, k, v to d + 1 rounded up to 8
(`attention_terms`).

The per-layer terms, the recomputed layer's and the checkpointed layer's are pinned exactly
against what autograd saves (tests/test_estimate_saved_bytes.py, small Llama, Qwen3, Qwen3-MoE and
gpt-oss layers, full, LoRA and QLoRA), and the experts' backward peak against what it allocates. The step peak: measured on an H100 with the decoder of velotune.models.transformer
(Llama-3.2-1B full at batch 8 x 2048 and 4 x 1024, checkpointing on and off; small Gemma 2 and
Qwen3 configs), max(forward end, backward start, backward end) came within 4% of the measured peak
above the weights; the weights came about 64 MiB under what was allocated before the step (buffers
and workspaces outside the parameters, covered by RESERVED_GIB). `benchmarks/measure_activations.py`
repeats that measurement (Llama-3.2-1B full, LoRA, QLoRA). With offloaded checkpoints a layer is
recomputed in pieces (`velotune.placement`), each smaller than the layer counted here.
Not counted: padding and packed-document attention masks (1 B x batch x seq^2 each) and the
SDPA math fallback they can trigger; CUDA context and allocator fragmentation (`what_fits` keeps
RESERVED_GIB aside for those).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from velotune import estimate_experts as experts
from velotune.memory_terms import BF16, F32, Term

if TYPE_CHECKING:   # the terms read config fields only, so the estimator sits below models/
    from velotune.models.config import ModelConfig

GIB = 2**30
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Memory a run needs beyond what PyTorch allocates: CUDA context, cuBLAS workspaces, fragmentation.
RESERVED_GIB = 1.5
NF4_BLOCKSIZE, NESTED_BLOCKSIZE = 64, 256
ADAMW8BIT_BLOCKSIZE = 256
ADAMW8BIT_MIN_SIZE = 4096      # smaller tensors, or ones not a whole number of blocks, keep full-precision moments
MLP_CHUNK_BYTES = 64 * 2**20   # the fused LoRA MLP's row chunks (lora.fused._MLP_CHUNK_BYTES; a test pins it)


class EstimateError(ValueError):
    """A setting the estimator cannot work with (names the setting)."""


@dataclass(frozen=True)
class Setup:
    """How the model is trained."""

    method: str = "qlora"
    batch: int = 1
    seq: int = 2048
    optim: str = "adamw"
    checkpointing: bool = True
    lora_r: int = 16
    offload_embeddings: bool = False   # the frozen input embedding table in host memory

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EstimateError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.optim not in OPTIMIZERS:
            raise EstimateError(f"optim {self.optim!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.offload_embeddings and self.method == "full":
            raise EstimateError("offload_embeddings: a full fine-tune trains the input embeddings, which must stay "
                                "on the GPU (use lora or qlora)")
        for name in ("batch", "seq", "lora_r"):
            if getattr(self, name) < 1:
                raise EstimateError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Estimate:
    """Bytes of each part of the peak; `activations` follows `setup.checkpointing`."""

    config: ModelConfig
    setup: Setup
    parameters: int
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations_checkpointed: int   # at the end of the forward pass
    activations_full: int
    backward_peak: int              # gradients and what is left of the activations, for setup.checkpointing
    host_weights: int = 0           # weights kept in host memory instead (offload_embeddings), not in total

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.setup.checkpointing else self.activations_full

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + max(self.activations, self.backward_peak)


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection of one dense decoder layer."""
    h, i = config.hidden_size, config.intermediate_size
    return {**attention_shapes(config), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def attention_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    h = config.hidden_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}


def layer_kinds(config: ModelConfig) -> list[bool]:
    """For each decoder layer, whether its MLP is a mixture of experts."""
    return [config.is_moe(i) for i in range(config.num_hidden_layers)]


def mlp_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    return [shape for name, shape in projection_shapes(config).items() if name not in attention_shapes(config)]


def nf4_bytes(numel: int) -> int:
    """Bytes of one matrix in bitsandbytes' nested NF4 layout (codes, absmax, tables)."""
    blocks = -(-numel // NF4_BLOCKSIZE)
    return -(-numel // 2) + blocks + F32 * -(-blocks // NESTED_BLOCKSIZE) + F32 * (16 + 256)


def lora_parameters(config: ModelConfig, r: int) -> int:
    """Adapters on the seven projections of every layer; on a mixture-of-experts layer the MLP
    projections mean its experts (per-expert adapters)."""
    return sum(adapter_tensors(config, r))


def adapter_tensors(config: ModelConfig, r: int) -> list[int]:
    """Element counts of every adapter tensor (A and B) of the model."""
    out: list[int] = []
    for moe in layer_kinds(config):
        out += [n for o, i in attention_shapes(config).values() for n in (r * i, o * r)]
        out += experts.expert_adapter_tensors(config, r) if moe else [n for o, i in mlp_shapes(config)
                                                                      for n in (r * i, o * r)]
    return out


def quantized_matrices(config: ModelConfig) -> list[int]:
    """Element counts of the matrices a 4-bit base stores as NF4: every layer's attention
    projections and its MLP's (a mixture-of-experts layer's two stacked expert weights)."""
    out: list[int] = []
    for moe in layer_kinds(config):
        out += [o * i for o, i in attention_shapes(config).values()]
        out += experts.expert_matrices(config) if moe else [o * i for o, i in mlp_shapes(config)]
    return out


def embedding_bytes(config: ModelConfig) -> int:
    """The input embedding table, bf16."""
    return BF16 * config.vocab_size * config.hidden_size


def host_weight_bytes(config: ModelConfig, setup: Setup) -> int:
    """Weights held in host memory instead of on the GPU: the input embeddings when offloaded."""
    if not setup.offload_embeddings:
        return 0
    if config.tie_word_embeddings:
        raise EstimateError("offload_embeddings: this model ties its output head to the input embeddings "
                            "(tie_word_embeddings), so the table must stay on the GPU")
    return embedding_bytes(config)


def weight_bytes(config: ModelConfig, setup: Setup) -> int:
    """GPU bytes of the weights (host-held ones excluded)."""
    return _all_weight_bytes(config, setup) - host_weight_bytes(config, setup)


def _all_weight_bytes(config: ModelConfig, setup: Setup) -> int:
    params = config.num_parameters()
    if setup.method == "full":
        return BF16 * params
    adapters = F32 * lora_parameters(config, setup.lora_r)
    if setup.method == "lora":
        return BF16 * params + adapters
    matrices = quantized_matrices(config)
    return BF16 * (params - sum(matrices)) + sum(map(nf4_bytes, matrices)) + adapters


def trainable_tensors(config: ModelConfig, setup: Setup) -> list[int]:
    """Element counts of the trainable tensors: the adapters' A and B, or for a full fine-tune
    the matrices (routers included) plus the vectors (norm weights; biases counted as
    hidden-size vectors)."""
    if setup.method != "full":
        return adapter_tensors(config, setup.lora_r)
    matrices = quantized_matrices(config) + [config.num_experts * config.hidden_size] * experts.moe_layers(config)
    matrices += [config.vocab_size * config.hidden_size] * (1 if config.tie_word_embeddings else 2)
    rest = config.num_parameters() - sum(matrices)
    h = config.hidden_size
    return matrices + [h] * (rest // h) + ([rest % h] if rest % h else [])


def eight_bit_state(n: int) -> bool:
    """Whether 8-bit AdamW keeps a tensor of `n` elements in 8 bits (torchao's rule)."""
    return n >= ADAMW8BIT_MIN_SIZE and n % ADAMW8BIT_BLOCKSIZE == 0


def optimizer_bytes(tensors: list[int], optim: str) -> int:
    if optim == "adamw":
        return 2 * F32 * sum(tensors)
    total = 0
    for n in tensors:
        if eight_bit_state(n):
            total += 2 * (n + F32 * (n // ADAMW8BIT_BLOCKSIZE) + F32 * 256)
        else:
            total += 2 * F32 * n
    return total


def mlp_wide_bytes(config: ModelConfig, setup: Setup) -> tuple[int, int]:
    """Per token: bytes of the MLP's [tokens x intermediate] tensors that a layer keeps for
    backward, and of those its backward makes besides (the tiled MLP holds both for one chunk).
    full: gate, up and act(gate) * up (the down projection saves its input), and in the backward
    the gradients of gate and up. lora, qlora: the fused MLP (`lora.fused.LoraMLP`) keeps gate and
    up only, making act(gate) * up one row chunk at a time, and writes dg and du over g and u; its
    one dh chunk does not grow with the tokens (see `backward_terms`)."""
    i = config.intermediate_size
    if setup.method == "full":
        return BF16 * 3 * i, BF16 * 2 * i
    return BF16 * 2 * i, 0


def mlp_chunk_bytes(config: ModelConfig, tokens: int) -> int:
    """Bytes of the largest row chunk of a [tokens x intermediate] bf16 tensor in the fused LoRA
    MLP: at most MLP_CHUNK_BYTES, in whole 128-row tiles (the arithmetic of `lora.fused._row_chunks`)."""
    row = BF16 * config.intermediate_size
    pieces = -(-row * tokens // MLP_CHUNK_BYTES)
    if pieces <= 1 or tokens <= 128:
        return row * tokens
    rows = -(-tokens // pieces)           # ceil(tokens / pieces) ...
    rows = -(-rows // 128) * 128          # ... rounded up to whole 128-row tiles
    return row * min(rows, tokens)


def layer_terms(config: ModelConfig, setup: Setup, recomputation: bool = False, moe: bool = False) -> list[Term]:
    """What one decoder layer keeps for backward without checkpointing (see module docstring);
    `moe`: a mixture-of-experts layer (velotune.estimate_experts). `recomputation`: what a
    checkpoint's recomputation of the layer keeps, the same less h @ A of the down adapter, which
    only a dense layer's first forward makes (`checkpoint_terms` counts it)."""
    h, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    q, kv = heads * config.head_dim, kv_heads * config.head_dim
    terms = [
        Term("layer input x and input_layernorm output: 2 B x 2h", BF16 * 2 * h),
        Term("x_mid = x + attention and the MLP norm output: 2 B x 2h", BF16 * 2 * h),
        Term("RMSNorm rstd, 2 norms: 4 B x 2", F32 * 2),
        *attention_terms(config, setup),
    ]
    if config.qk_norm:
        terms.append(Term("q and k before q_norm/k_norm, their rstd: 2 B x (q + kv) + 4 B x (H + Hkv)",
                          BF16 * (q + kv) + F32 * (heads + kv_heads)))
    if config.sandwich_norms:
        terms.append(Term("attention and MLP outputs into the sandwich norms, rstd: 2 B x 2h + 4 B x 2",
                          BF16 * 2 * h + F32 * 2))
    r = setup.lora_r
    if moe:
        terms += experts.saved_terms(config, setup.method, setup.batch * setup.seq, r)
    elif setup.method == "full":
        terms.append(Term("gate, up and act(gate) * up: 2 B x 3i", mlp_wide_bytes(config, setup)[0]))
    else:
        terms.append(Term("gate and up (act(gate) * up is remade in the backward): 2 B x 2i",
                          mlp_wide_bytes(config, setup)[0]))
    if setup.method != "full":
        if moe:
            terms.append(Term("X @ A of the q/k/v and o adapters: 2 B x 4r", BF16 * 4 * r))
        else:
            terms.append(Term("X @ A of the q/k/v, o and gate/up adapters: 2 B x 6r", BF16 * 6 * r))
        if not recomputation and not moe:
            terms.append(_down_xa_term(setup))
        fused = attention_shapes(config).values() if moe else projection_shapes(config).values()
        terms.append(Term("bf16 copies of the adapters' A and B, saved by the fused blocks: 2 B x r x sum(in + out)",
                          0, BF16 * r * sum(o + i for o, i in fused)))
    return terms


def attention_terms(config: ModelConfig, setup: Setup) -> list[Term]:
    """What attention keeps: flash attention's q, k, v, output and log-sum-exp; Gemma 2's
    soft-capped explicit attention; or gpt-oss's sinks (models/sinks.py), where q, k, v and the
    output are padded to W = d + 1 rounded up to 8 per head, k and v repeated to every head with
    the sink key first, the mask carries the sink's column and o_proj keeps a copy of the output
    cut back to d (measured on the CPU; the GPU's memory-efficient kernel pads its log-sum-exp
    to 32 rows)."""
    heads, d = config.num_attention_heads, config.head_dim
    q, kv = heads * d, config.num_key_value_heads * d
    b, s = setup.batch, setup.seq
    if config.attn_logit_softcapping is not None:  # Gemma 2 soft-capping: matmul, tanh, softmax instead of SDPA
        return [Term("q after RoPE and attention output: 2 B x 2q", BF16 * 2 * q),
                Term("k and v repeated to all heads: 2 B x 2q", BF16 * 2 * q),
                Term("tanh(scores) bf16, softmax f32, probs bf16, causal mask: (8 B x batch x H + 1 B) x seq^2",
                     0, (8 * b * heads + 1) * s * s)]
    if config.attention_sinks:
        width = (d + 1 + 7) // 8 * 8
        return [Term("padded q and output, the output cut back for o_proj: 2 B x (2 H W + q)",
                     BF16 * (2 * heads * width + q)),
                Term("padded k and v on every head, the sink key too: 2 B x 2 H W x (1 + 1/seq)",
                     BF16 * 2 * heads * width, BF16 * 2 * b * heads * width),
                Term("log-sum-exp: 4 B x H", F32 * heads),
                Term("the mask with the sink's column, bf16: 2 B x seq x (seq + 1)", 0, BF16 * s * (s + 1))]
    return [Term("q after RoPE and attention output: 2 B x 2q", BF16 * 2 * q),
            Term("k after RoPE and v: 2 B x 2kv", BF16 * 2 * kv),
            Term("flash-attention log-sum-exp: 4 B x H", F32 * heads)]


def _down_xa_term(setup: Setup) -> Term:
    return Term("h @ A of the down adapter, kept by the fused MLP from forward to backward: 2 B x r",
                BF16 * setup.lora_r)


def layer_bytes(config: ModelConfig, setup: Setup, recomputation: bool = False) -> list[int]:
    """What each decoder layer keeps for backward (`layer_terms`), layer by layer."""
    tokens = setup.batch * setup.seq
    kinds = layer_kinds(config)
    size = {moe: sum(t.bytes(tokens) for t in layer_terms(config, setup, recomputation, moe)) for moe in set(kinds)}
    return [size[moe] for moe in kinds]


def model_terms(config: ModelConfig, setup: Setup) -> list[Term]:
    """Model-wide activations and workspaces at the end of the forward pass."""
    h = config.hidden_size
    terms = [
        Term("RoPE cos and sin: 2 B x 2 rotary_dim", BF16 * 2 * config.rotary_dim),
        Term("final norm in/out, target rows, loss hidden-gradient, one logits chunk: 2 B x 5h + 4 B",
             BF16 * 5 * h + F32),
    ]
    if setup.method == "full":
        terms.append(Term("loss head gradient, f32 accumulator and bf16 copy: 6 B x V x h", 0,
                          (F32 + BF16) * config.vocab_size * h))
    if setup.method == "qlora":
        terms.append(max((_dequantized_term(config, moe) for moe in set(layer_kinds(config))), key=lambda t: t.fixed))
    return terms


def _dequantized_term(config: ModelConfig, moe: bool) -> Term:
    if moe:
        return Term("a layer's 4-bit experts dequantized: 2 B x 3 E I h", 0, experts.dequantized_experts_bytes(config))
    largest = max(o * i for o, i in projection_shapes(config).values())
    return Term("one dequantized projection: 2 B x largest out x in", 0, BF16 * largest)


def backward_terms(config: ModelConfig, setup: Setup, moe: bool = False) -> list[Term]:
    """Tmp: temporaries of one layer's backward, on top of its saved activations. The peak is in
    the MLP's backward, while every saved tensor of the layer is still alive; `moe`: of a
    mixture-of-experts layer (velotune.estimate_experts)."""
    h = config.hidden_size
    if moe:
        terms = [Term("gradient of the layer output: 2 B x h", BF16 * h),
                 *experts.backward_terms(config, setup.method, setup.lora_r)]
    elif setup.method == "full":
        terms = [Term("activation gradients of one layer: 2 B x (2h + 2i)",
                      BF16 * 2 * h + mlp_wide_bytes(config, setup)[1])]
    else:
        # LoraMLP.backward: dh is made one row chunk at a time and freed before dX is made; dg and
        # du are written over g and u.
        tokens = setup.batch * setup.seq
        terms = [Term("gradient of the layer output: 2 B x h", BF16 * h),
                 Term("then one of: a dh chunk of the fused MLP (rows x i, <= 64 MiB) or its input gradient "
                      "(2 B x T x h)", 0, max(mlp_chunk_bytes(config, tokens), BF16 * h * tokens))]
    if setup.method == "qlora":
        terms.append(_dequantized_term(config, moe))
    if config.attn_logit_softcapping is not None:
        terms.append(Term("f32 gradient of the attention scores: 4 B x batch x H x seq^2", 0,
                          F32 * setup.batch * config.num_attention_heads * setup.seq**2))
    return terms


def backward_bytes(config: ModelConfig, setup: Setup) -> int:
    """Tmp of the layer kind whose backward adds the most."""
    tokens = setup.batch * setup.seq
    return max(sum(t.bytes(tokens) for t in backward_terms(config, setup, moe)) for moe in set(layer_kinds(config)))


def checkpoint_terms(config: ModelConfig, setup: Setup | None = None, moe: bool = False) -> list[Term]:
    """What one checkpointed layer keeps from its forward to its backward: its input, and what
    autograd Functions keep as ctx attributes, which torch's checkpoint does not drop: the fused
    LoRA MLP's h @ A of the down adapter, a mixture-of-experts layer's route plan. Without a
    setup: a full fine-tune's dense layer."""
    terms = [Term("layer input: 2 B x h", BF16 * config.hidden_size)]
    if setup is not None and moe:
        terms += experts.plan_terms(config, setup.batch * setup.seq)
    elif setup is not None and setup.method != "full":
        terms.append(_down_xa_term(setup))
    return terms


def checkpoint_term(config: ModelConfig, setup: Setup | None = None) -> Term:
    """Every layer checkpointed: their inputs and what their graphs keep."""
    kinds = layer_kinds(config)
    per_kind = {moe: checkpoint_terms(config, setup, moe) for moe in set(kinds)}
    what = ("checkpointed layer inputs: L x 2 B x h" if all(len(t) == 1 for t in per_kind.values()) else
            "checkpointed layer inputs and what their graphs keep (h @ A_down, route plans)")
    return Term(what, sum(t.per_token for moe in kinds for t in per_kind[moe]),
                sum(t.fixed for moe in kinds for t in per_kind[moe]))


def estimate(config: ModelConfig, setup: Setup) -> Estimate:
    params = config.num_parameters()
    trainable = params if setup.method == "full" else lora_parameters(config, setup.lora_r)
    grad_bytes = BF16 if setup.method == "full" else F32
    tokens = setup.batch * setup.seq
    layers = layer_bytes(config, setup)
    recomputed = max(layer_bytes(config, setup, recomputation=True))
    model_wide = sum(term.bytes(tokens) for term in model_terms(config, setup))
    temporaries = backward_bytes(config, setup)
    gradients = grad_bytes * trainable
    full = setup.method == "full"
    head_gradient = BF16 * config.vocab_size * config.hidden_size if full else 0
    embedding_gradient = 0 if config.tie_word_embeddings else head_gradient
    checkpointed = checkpoint_term(config, setup).bytes(tokens)
    if setup.checkpointing:
        backward_start = checkpointed + head_gradient + temporaries + recomputed
        last_layer = recomputed
    else:
        backward_start = sum(layers) + head_gradient + temporaries
        last_layer = max(layers)
    backward_end = max(gradients - embedding_gradient + last_layer + temporaries, gradients)
    return Estimate(
        config=config, setup=setup, parameters=params, trainable_parameters=trainable,
        weights=weight_bytes(config, setup), gradients=gradients, host_weights=host_weight_bytes(config, setup),
        optimizer=optimizer_bytes(trainable_tensors(config, setup), setup.optim),
        activations_checkpointed=checkpointed + max(model_wide, recomputed),
        activations_full=sum(layers) + model_wide,
        backward_peak=max(backward_start, backward_end),
    )


@dataclass(frozen=True)
class Fit:
    """The largest batch at `setup.seq`, and the largest seq at batch 1 (0: nothing fits)."""

    budget_gib: float
    max_batch: int
    max_seq: int
    seq_capped: bool    # max_seq stopped at the model's max_position_embeddings


def fits(config: ModelConfig, setup: Setup, gpu_gib: float) -> bool:
    return estimate(config, setup).total <= (gpu_gib - RESERVED_GIB) * GIB


def _largest(ok, limit: int) -> int:
    """Largest n in [1, limit] with ok(n) (ok is monotone: true up to some n), or 0."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # ok(lo), not ok(hi) (or hi past the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def what_fits(config: ModelConfig, setup: Setup, gpu_gib: float, max_batch: int = 1 << 16) -> Fit:
    if gpu_gib <= RESERVED_GIB:
        raise EstimateError(f"gpu-gib must exceed the {RESERVED_GIB} GiB kept for the CUDA context, got {gpu_gib}")
    seq_limit = config.max_position_embeddings
    batch = _largest(lambda b: fits(config, replace(setup, batch=b), gpu_gib), max_batch)
    seq = _largest(lambda s: fits(config, replace(setup, batch=1, seq=s), gpu_gib), seq_limit)
    return Fit(budget_gib=gpu_gib, max_batch=batch, max_seq=seq, seq_capped=seq == seq_limit)


@dataclass(frozen=True)
class Saving:
    """What one memory saving does to the part of memory it acts on, for this model and setup."""

    name: str
    part: str
    without: int
    with_: int
    how: str
    in_use: bool


def savings(config: ModelConfig, setup: Setup) -> list[Saving]:
    full = estimate(config, replace(setup, method="full", offload_embeddings=False))
    lora = estimate(config, replace(setup, method="lora"))
    current = estimate(config, setup)
    r = setup.lora_r
    return [
        Saving("8-bit AdamW", "optimizer states", optimizer_bytes(trainable_tensors(config, setup), "adamw"),
               optimizer_bytes(trainable_tensors(config, setup), "adamw8bit"),
               "two uint8 moments with a float32 scale per 256 values instead of two float32 moments",
               setup.optim == "adamw8bit"),
        Saving("4-bit weights (QLoRA)", "weights", lora.weights, estimate(config, replace(setup, method="qlora")).weights,
               "frozen projection matrices stored as NF4 (about 0.52 B per weight instead of 2 B)",
               setup.method == "qlora"),
        Saving("gradient checkpointing", "activations", current.activations_full, current.activations_checkpointed,
               "each layer keeps only its input; backward recomputes one layer at a time (about 1/3 more compute)",
               setup.checkpointing),
        *([Saving("embeddings in host memory", "weights", embedding_bytes(config), 0,
                  "the frozen input embedding table stays in host memory; each step copies only its tokens' rows",
                  setup.offload_embeddings)]
          if setup.method != "full" and not config.tie_word_embeddings else []),
        Saving(f"LoRA (r={r})", "gradients + optimizer states", full.gradients + full.optimizer,
               lora.gradients + lora.optimizer,
               f"trains {lora.trainable_parameters:,} adapter weights instead of all {full.parameters:,}",
               setup.method != "full"),
    ]
