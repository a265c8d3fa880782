"""One decoder-only transformer for every supported family, driven by `ModelConfig`.

Design choices:
- Parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so
  checkpoints, PEFT adapters and exports map one to one without renaming tables.
- Every hot piece (norm, rotary, GLU, loss) goes through `velotune.kernels`, which picks a Triton
  kernel on CUDA and the PyTorch reference elsewhere; the model code is the same on both paths.
- Family quirks are config fields read inside the blocks (bias, q/k norm, sandwich norms,
  soft-caps, sliding windows, embedding scale); there are no per-family classes.
- With labels, the loss is computed from hidden states of target positions only, through
  `kernels.linear_cross_entropy`, which returns a sum and a token count: the trainer divides by
  the token count of a whole optimizer step, making gradient accumulation exact. Logits are only
  materialised when asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from velotune import kernels
from velotune.estimate import Setup
from velotune.infer.cache import KVCache
from velotune.infer.engine import generate_tensor
from velotune.infer.sampling import SamplingParams
from velotune.lora import fused as lora_fused
from velotune.models import host_embedding, kept_attention, layer_checkpoint
from velotune.models.checkpointing import (
    CheckpointChoice,
    MemoryBudget,
    choose_checkpointed_layers,
    parse_checkpointing,
    recomputing,
    run_checkpointed,
)
from velotune.models.config import ModelConfig
from velotune.models.masks import (
    DocumentSpans,
    Mask,
    attention_mask_for,
    document_ids,
    image_blocks,
    spans_from_positions,
)
from velotune.models.moe import MoE
from velotune.models.norms import RMSNorm
from velotune.models.sinks import attend_with_sinks
from velotune.models.offload import LayerInputOffloader, OffloadStats, PinnedHostPool, host_room_bytes
from velotune.models.tiled_mlp import mlp_chunk_size, tiled_mlp
from velotune.models.vision import Projector, VisionTower
from velotune.models.vision_grid import mrope_positions
from velotune.models.token_logps import token_logps
from velotune.models.kept_attention import KeptAttention, with_kept_attention
from velotune.models.loop_graphs import LoopGraphs
from velotune.models.long_context import working_bytes
from velotune.placement import HOST, NONE, Placement, parked_count, plan_placement


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None        # summed token losses (for exact accumulation)
    num_targets: torch.Tensor | None = None     # tokens that contributed to loss_sum
    hidden_states: torch.Tensor | None = None   # final-norm output, [B, T, H]
    aux_loss_sum: torch.Tensor | None = None    # load balancing, summed over rows by target count (models/moe.py)
    token_logps: torch.Tensor | None = None     # [B, T-1] log p(labels[:, 1:]), 0 where ignored
    logits_skipped: bool = False                # labels given and return_logits left at its default
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor | None:
        """[B, T, vocab]; reading it after a forward that skipped them raises, saying how to ask."""
        if self._logits is None and self.logits_skipped:
            raise AttributeError("logits were not computed: a forward given labels returns the loss only "
                                 "(its [tokens x vocab] logits cost memory and time nobody asked for); "
                                 "pass return_logits=True to get them too")
        return self._logits

    @logits.setter
    def logits(self, value: torch.Tensor | None) -> None:
        self._logits = value


class Rotary(nn.Module):
    """cos/sin tables for per-token position ids (so packed sequences restart cleanly); one table
    per kind of layer ("global", Gemma 3's "local"; NoPE layers get none). Position ids [3, B, T]
    are M-RoPE's (`ModelConfig.mrope_section`); [B, T] ones mean the same id on all three axes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self._inv_freq: dict[tuple[torch.device, str], torch.Tensor] = {}

    def inv_freq(self, device: torch.device, kind: str = "global") -> torch.Tensor:
        if (device, kind) not in self._inv_freq:
            self._inv_freq[device, kind] = rope_inv_freq(self.config, local=kind == "local").to(device)
        return self._inv_freq[device, kind]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                kind: str = "global") -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device, kind)
        if position_ids.dim() == 3:   # M-RoPE [3, B, T]: each frequency section turned by its own axis
            sections = self.config.mrope_section
            freqs = torch.cat([part[i % 3] for i, part in enumerate(freqs.split(sections, dim=-1))], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if kind == "global" and (factor := rope_attention_factor(self.config)) != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype), sin.to(dtype)

    def per_layer(self, position_ids: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(cos, sin) for each decoder layer, each kind computed once; (None, None) for NoPE layers."""
        kinds = [self.config.rope_kind(i) for i in range(self.config.num_hidden_layers)]
        tables = {kind: self(position_ids, dtype, kind) for kind in set(kinds) if kind is not None}
        return [tables.get(kind, (None, None)) for kind in kinds]


def rope_inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's frequency-dependent scaling, linear scaling or YaRN;
    `local`: Gemma 3's sliding layers (their own base, never scaled)."""
    dim = config.rotary_dim
    theta = config.local_rope_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling or local:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "yarn":
        return yarn_inv_freq(inv_freq, theta, dim, scaling, config.max_position_embeddings)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def yarn_inv_freq(inv_freq: torch.Tensor, theta: float, dim: int, s: dict, max_positions: int) -> torch.Tensor:
    """YaRN (gpt-oss): frequencies that turn fewer than `beta_slow` times over the original
    context are divided by `factor`, those turning more than `beta_fast` times kept, a linear
    ramp over the dimensions between."""
    factor = s["factor"]
    original = s.get("original_max_position_embeddings") or max_positions

    def dim_of(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(config: ModelConfig) -> float:
    """YaRN's scale of cos and sin (attention temperature), 1 for every other RoPE."""
    s = config.rope_scaling
    if not s or s["rope_type"] != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(s["factor"], s["mscale"]) / mscale(s["factor"], s["mscale_all_dim"])
    return mscale(s["factor"])


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.norm_weight_offset)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.norm_weight_offset)
        self.qk_norm = c.qk_norm
        self.scale = c.attention_scale
        self.softcap = c.attn_logit_softcapping
        if c.attention_sinks:   # gpt-oss: one learned logit per head in every softmax's denominator
            self.sinks = nn.Parameter(torch.zeros(self.num_heads))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Mask, cache: KVCache | None, output_needed: bool = True) -> torch.Tensor:
        """`output_needed=False`: the output projection saves its input but is not run (see
        `lora_fused.project`); for a recomputation whose output is thrown away."""
        q, k, v = self.project(x)
        return self.attend_and_project(q, k, v, cos, sin, mask, cache, output_needed)

    def project(self, x: torch.Tensor, output_needed: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, T, heads x head_dim] before RoPE (one fused block under LoRA);
        `output_needed=False` as in `forward`, for the projections' base matmuls."""
        return lora_fused.project(x, self.q_proj, self.k_proj, self.v_proj, output_needed=output_needed)

    def attend_and_project(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, mask: Mask, cache: KVCache | None = None,
                           output_needed: bool = True) -> torch.Tensor:
        """The rest of `forward` from the projections' outputs: q/k norms, RoPE, attention, o_proj."""
        b, t, _ = q.shape
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cos is not None:   # None: a NoPE layer (SmolLM3)
            q, k = kernels.apply_rope(q, k, cos, sin)
        if isinstance(mask, DocumentSpans):   # packed documents: one causal triangle each, no mask
            # (RoPE's outputs keep the projections' [B, T, H, D] memory order: these are views)
            flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], self.head_dim) for x in (q, k, v)]
            out = kernels.varlen_attention(*flat, mask.cu_seqlens, mask.max_len, self.scale, mask.window)
            attended = out.view(b, t, self.num_heads * self.head_dim)
            return lora_fused.project(attended, self.o_proj, output_needed=output_needed)[0]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if hasattr(self, "sinks"):
            out = attend_with_sinks(q, k, v, mask, self.sinks, self.scale)
        else:
            out = self.attend(q, k, v, mask)
        attended = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return lora_fused.project(attended, self.o_proj, output_needed=output_needed)[0]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        causal = mask is None and q.shape[2] > 1
        kept = kept_attention.current()
        if kept is not None and causal and self.softcap is None and (not q.is_cuda or q.dtype != torch.float32):
            return kept_attention.flash_attention(q, k, v, self.scale, kept)
        groups = self.num_heads // self.num_kv_heads
        if self.softcap is None and q.shape[2] == 1 and groups > 1:
            # Decoding one token: the query heads sharing a key/value head become that head's
            # query rows, so keys/values are read once instead of being repeated per query head
            # (what SDPA's grouped-query path does). A [B|1, 1, 1, S] mask broadcasts over them.
            b, _, _, d = q.shape
            out = F.scaled_dot_product_attention(q.reshape(b, self.num_kv_heads, groups, d), k, v,
                                                 attn_mask=mask, scale=self.scale)
            return out.reshape(b, self.num_heads, 1, d)
        if self.softcap is None:
            if groups > 1 and q.is_cuda and (mask is not None or q.dtype == torch.float32):
                # SDPA's grouped-query path exists only in its flash and math kernels, and flash
                # takes neither a mask nor float32: repeated key/value heads let the
                # memory-efficient kernel run instead of the math one, whose [T x T] scores took an
                # 8-layer float32 test model at 8192 tokens to an 8 GB peak on an H100.
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  scale=self.scale, enable_gqa=True)
        # Soft-capped scores (Gemma 2) are not expressible through SDPA: explicit attention.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor, output_needed: bool = True) -> torch.Tensor:
        """`output_needed=False`: only what the backward reads is made (see `lora_fused.mlp`)."""
        return lora_fused.mlp(x, self.gate_proj, self.up_proj, self.down_proj, self.act, output_needed)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        eps, off = config.rms_norm_eps, config.norm_weight_offset
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe(layer_idx) else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, off)
        # Llama-style: post_attention_layernorm is the norm before the MLP. Gemma 2 ("sandwich"):
        # it normalises the attention output, and two more norms wrap the MLP.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, off)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, off)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Mask, cache: KVCache | None = None, mlp_chunk: int = 0,
                pending: torch.Tensor | None = None, defer: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`mlp_chunk` > 0 runs the MLP over chunks of that many tokens (models/tiled_mlp.py).

        `pending` is the previous layer's last residual term, not yet added to x: the input norm
        adds it (`add_rms_norm`, one pass). `defer=True` returns (residual, this layer's last
        term) instead of their sum, for the next layer or the final norm to add. Between layers
        that are not checkpointed this spares the residual add's pass over [tokens, hidden] in the
        forward, and the backward's separate sum of the stream's two gradients."""
        normed, x = self.input_layernorm.add_and_normalize(x, pending)
        h = self.self_attn(normed, cos, sin, mask, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            mlp_out = tiled_mlp(self.mlp, self.pre_feedforward_layernorm(x), mlp_chunk)
            last = self.post_feedforward_layernorm(mlp_out)
        else:
            normed, x = self.post_attention_layernorm.add_and_normalize(x, h)
            # The MLP's output only joins the residual here, so when a checkpoint recomputes this
            # layer (and throws its output away) the MLP saves what its backward needs and skips the
            # rest: for Llama-3.1-8B the down projection, a quarter of the layer's matmul FLOPs.
            # (With sandwich norms a norm saves from the MLP output, so it is always made.)
            last = tiled_mlp(self.mlp, normed, mlp_chunk, output_needed=not recomputing())
        return (x, last) if defer else x + last

    # The two halves of a pre-norm layer, each checkpointed on its own when checkpoints are
    # offloaded (`Transformer.hidden_states`): the residual stream between them is then saved as
    # the second half's input, so the first half's recomputation needs no output either and skips
    # the output projection too. Same arithmetic as `forward` except that the residual add and
    # the second norm are two kernels instead of one.

    def attention_residual(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           mask: Mask, cache: KVCache | None = None) -> torch.Tensor:
        """x + attention(norm(x))."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, output_needed=not recomputing())

    # Finer still (`Transformer.checkpoint_pieces`, 3): the attention half split at the q/k/v
    # projections, whose outputs are then parked as the second piece's inputs. Neither piece's
    # recomputation runs a base matmul of the attention: the first asks the projections for no
    # output, the second has q, k and v given and skips o_proj.

    def attention_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of norm(x)."""
        return self.self_attn.project(self.input_layernorm(x), output_needed=not recomputing())

    def attention_output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, mask: Mask) -> torch.Tensor:
        """attention(q, k, v) through o_proj: what the residual stream adds."""
        return self.self_attn.attend_and_project(q, k, v, cos, sin, mask, output_needed=not recomputing())

    def mlp_residual(self, x: torch.Tensor, mlp_chunk: int = 0) -> torch.Tensor:
        """x + mlp(norm(x))."""
        normed = self.post_attention_layernorm(x)
        return x + tiled_mlp(self.mlp, normed, mlp_chunk, output_needed=not recomputing())


def router_aux_loss_sum(stats: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor | None,
                        labels: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """sum over rows r of targets_r * E * sum_e f_re P_re, where f and P are the shares of choices
    and the mean probabilities over row r's real tokens in every MoE layer (see models/moe.py)."""
    counts = torch.stack([c for c, _ in stats]).sum(0)      # [B, T, E], summed over layers
    probs = torch.stack([p for _, p in stats]).sum(0)
    real = (torch.ones(labels.shape, device=labels.device) if attention_mask is None
            else attention_mask.to(probs.dtype))
    tokens = real.sum(1) * len(stats)                        # (layer, token) pairs per row
    f = (counts * real[..., None]).sum(1) / tokens[:, None]
    p = (probs * real[..., None]).sum(1) / tokens[:, None]
    per_row = config.num_experts * (f * p).sum(-1)
    targets = (labels[:, 1:] != -100).sum(1).to(per_row.dtype)
    return (targets * per_row).sum()


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weight_offset)
        self.rotary = Rotary(config)


# A single row longer than this that the caller gave as one packed document runs as plain causal
# attention (checking costs one device sync, nothing at these lengths), so a layer can keep its
# attention output (models/kept_attention.py), which the variable-length kernel does not offer.
LONG_ROW_TOKENS = 16384


def one_document(documents: DocumentSpans) -> bool:
    """Whether the spans hold exactly one non-empty document (waits for the device)."""
    return int((documents.cu_seqlens.diff() > 0).sum()) == 1


class Transformer(nn.Module):
    """The causal language model: `model` (the decoder stack) and `lm_head`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Training memory (models/checkpointing.py, offload.py, tiled_mlp.py):
        self.gradient_checkpointing: bool | str = False   # True, False or "auto" (as the budget needs)
        self.offload_checkpoints = False                   # checkpointed inputs to pinned host memory
        self.offload_min_tokens = 0                        # ...by forwards of at least this many tokens
        self.checkpoints_kept_on_gpu: int | str = "auto"   # ...except those the host has no room for, or the last N
        self.placement: Placement | None = None            # where the last training forward put them
        self.keep_attention_outputs = True                 # parked layers keep them where room allows
        self.mlp_chunk_tokens: int | None = None           # None: tile long inputs; 0: never; N: chunks of N
        self.memory_budget: MemoryBudget | None = None     # for "auto"; None: this device, AdamW states
        self.checkpoint_choice: CheckpointChoice | None = None   # what "auto" chose for the last forward
        self.offload_stats = OffloadStats()                # what the last forward's offload moved
        self.offload_pool = PinnedHostPool()               # its host buffers, reused from step to step
        self.max_seq_length = config.max_position_embeddings
        # A user's own loop (models/loop_graphs.py): a training forward of ids and labels whose shape
        # was seen before replays captured CUDA graphs. The Trainer turns it off: it graphs whole
        # micro-batches itself (train/graphed_step.py).
        self.cuda_graphs = True
        self.loop_graphs = LoopGraphs()
        if config.vision is not None:   # a vision-language model (models/vision.py)
            self.vision_tower = VisionTower(config.vision)
            self.multi_modal_projector = Projector(config.vision)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (call again after
        anything that replaces parameters, such as `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def put_embeddings_on_host(self, mode: bool | str = True) -> bool:
        """Keep the frozen input embedding table in host memory and copy only each step's rows to
        the device (models/host_embedding.py). True: refuse tied or trainable embeddings with the
        reason; "auto": only where that is allowed and the model is on a GPU; False: bring the
        table back. Returns whether the table is in host memory now."""
        return host_embedding.put_on_host(self, mode, "model.put_embeddings_on_host")

    def put_embeddings_on_device(self) -> None:
        """Undo `put_embeddings_on_host`: the table becomes an nn.Embedding on the compute device."""
        host_embedding.put_on_device(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        return_logits: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        documents: DocumentSpans | None = None,
        return_token_logps: bool = False,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> ModelOutput:
        """`return_logits`: None (the default) makes them only when no labels are given, as a forward
        with labels is a step whose loss the model computes itself (Llama-3.1-8B's logits of 2,048
        tokens are 0.49 GiB in bf16, plus a [tokens x hidden x vocab] matmul); True always, False never.
        `inputs_embeds` [B, T, H], when given, replaces the embedding lookup of `input_ids` (the
        CUDA-graph step looks up a host-memory table outside its graph: train/graphed_step.py).
        `documents` (with `position_ids`): the packed documents' spans, as a padding-free batch
        brings them (data/batching.py:collate_flat); without it they are read from restarting
        position ids. With labels, `return_token_logps` gives each target's log-probability
        (`token_logps`) instead of the summed loss: what the preference and RL objectives read.
        `pixel_values` [images, C, H, W] (vision-language models): the images of the batch in the
        order their placeholder tokens appear, row by row (`embed_with_images`); for a
        dynamic-resolution tower (Qwen2.5-VL) their flat patches, with each image's patch grid in
        `image_grid_thw` [images, 3], which also sets the decoder's M-RoPE positions.
        A training forward of ids and labels (and a padding mask) on a GPU may replay a CUDA graph
        (`cuda_graphs`, models/loop_graphs.py); its output then holds the loss, loss_sum and
        num_targets only."""
        skip_logits = return_logits is None and labels is not None
        if return_logits is None:
            return_logits = labels is None
        if attention_mask is not None and labels is not None and self.cuda_graphs and self.training \
                and cache is None and not kernels.capturing(attention_mask) and bool(attention_mask.all()):
            attention_mask = None   # every token real: the same as no mask (masks.attention_mask_for drops it too)
        plain = (position_ids is None and cache is None and not return_logits and inputs_embeds is None
                 and documents is None and not return_token_logps and pixel_values is None)
        if labels is not None and self.cuda_graphs:
            replayed = self.loop_graphs.run(self, input_ids, labels, plain, attention_mask)
            if replayed is not None:
                loss_sum, num_targets = replayed
                return ModelOutput(loss=loss_sum / num_targets.clamp(min=1), loss_sum=loss_sum, num_targets=num_targets,
                                   logits_skipped=skip_logits)
        # A layer's MLP is where a mixture of experts sits (walking every module instead took
        # milliseconds of Python per step at 8B: a thousand modules under LoRA).
        experts = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        balance = (labels is not None and not return_token_logps and self.training and torch.is_grad_enabled()
                   and bool(experts) and self.config.router_aux_loss_coef > 0)
        for moe in experts:
            moe.collect_aux, moe.aux_statistics = balance, []
        scaled, blocks, rope = False, None, None
        if pixel_values is not None:
            if inputs_embeds is not None:
                raise ValueError("pass pixel_values or inputs_embeds, not both")
            inputs_embeds, scaled = self.embed_with_images(input_ids, pixel_values, image_grid_thw), True
            blocks = self.image_blocks(input_ids)
            rope = self.rope_positions(input_ids, position_ids, image_grid_thw)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds, documents,
                                    embeds_scaled=scaled, image_blocks=blocks, rope_positions=rope)
        out = ModelOutput(hidden_states=hidden, logits_skipped=skip_logits)
        if labels is not None and return_token_logps:
            out.token_logps = self.token_logps_from_hidden(hidden, labels)
        elif labels is not None:
            out.loss_sum, out.num_targets = self.loss_from_hidden(hidden, labels)
            if balance:
                stats = [s for moe in experts for s in moe.aux_statistics]
                out.aux_loss_sum = router_aux_loss_sum(stats, attention_mask, labels, self.config)
                out.loss_sum = out.loss_sum + self.config.router_aux_loss_coef * out.aux_loss_sum
                for moe in experts:
                    moe.collect_aux, moe.aux_statistics = False, []
            out.loss = out.loss_sum / out.num_targets.clamp(min=1)
        if return_logits:
            out.logits = self.logits_from_hidden(hidden)
        return out

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      inputs_embeds: torch.Tensor | None = None,
                      documents: DocumentSpans | None = None, *, embeds_scaled: bool = False,
                      image_blocks: torch.Tensor | None = None,
                      rope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, H]. `embeds_scaled`: `inputs_embeds` already carry the
        family's embedding multiplier (`embed_with_images` scales the text rows, not the images').
        `image_blocks` [B, T] (`masks.image_blocks`): each image's tokens see each other both ways
        (Gemma 3), which takes an explicit mask. `rope_positions` [3, B, T]: M-RoPE position ids
        (`rope_positions`) for the rotary tables; `position_ids` still say where documents start."""
        c = self.config
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        # Only caller-given positions can hold packed documents. Generated ones are never tested:
        # inside a CUDA graph capture the test cannot run, and the ids it then builds would turn
        # plain causal attention into a masked one (3x slower in cuDNN on an H100).
        # Attention without a soft-cap or sinks takes packed documents as spans (variable-length
        # attention); a soft-capped one, or one with sinks, as a boolean mask.
        docs = None
        spans_allowed = c.varlen_attention and cache is None and attention_mask is None and image_blocks is None
        if documents is not None and position_ids is None:
            raise ValueError("documents (packed spans) need the position_ids that restart at each document")
        if position_ids is None:
            position_ids = torch.arange(offset, offset + t, device=input_ids.device).expand(b, t)
        elif cache is None and attention_mask is None and documents is None:
            if spans_allowed and not kernels.capturing(position_ids):
                documents = spans_from_positions(position_ids)
            else:   # soft-capped attention, or inside a capture (which cannot count documents)
                docs = document_ids(position_ids)
        if documents is not None and not spans_allowed:
            docs, documents = document_ids(position_ids), None
        if documents is not None and b == 1 and t > LONG_ROW_TOKENS and documents.max_len >= t \
                and not kernels.capturing(input_ids) and one_document(documents):
            documents = None   # one long row: plain causal attention, the same, whose output a layer can keep
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if c.embedding_multiplier != 1.0 and not embeds_scaled:
            x = x * torch.tensor(c.embedding_multiplier, dtype=x.dtype)
        ropes = self.model.rotary.per_layer(position_ids if rope_positions is None else rope_positions, x.dtype)
        windows = {c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)}
        masks: dict[int | None, Mask] = {
            window: (documents.windowed(window) if documents is not None
                     else attention_mask_for(t, offset, attention_mask, docs, window, x.device, image_blocks))
            for window in windows
        }
        mlp_chunk = mlp_chunk_size(self.mlp_chunk_tokens, b * t)
        checkpointed = self.checkpointed_layers(b, t, mlp_chunk)
        # packed documents attend within themselves: their longest sets the attention's cost
        span = documents.max_len if documents is not None else t
        placement = self.plan_placement(x, checkpointed, span)
        offloader = None
        if placement.offloaded:
            self.offload_stats = OffloadStats()
            offloader = LayerInputOffloader(x.device, self.offload_stats, self.offload_pool,
                                            planned=sum(parked_count(placement.pieces[i])
                                                        for i in range(placement.offloaded)),
                                            planned_bytes=placement.host_bytes)
        pending = None   # the last layer's MLP (or post-norm) output, not yet added to x
        for i, layer in enumerate(self.model.layers):
            mask = masks[c.sliding_window if c.is_sliding(i) else None]
            cos, sin = ropes[i]
            where, pieces = placement.where[i], placement.pieces[i]
            if where == HOST and pieces == 3:
                q, k, v = run_checkpointed(layer.attention_inputs, x, offloader=offloader)
                x = x + run_checkpointed(layer.attention_output, q, k, v, cos, sin, mask, offloader=offloader,
                                         parked=3)
                del q, k, v
                x = run_checkpointed(layer.mlp_residual, x, mlp_chunk, offloader=offloader)
            elif where == HOST and pieces == 2:
                x = run_checkpointed(layer.attention_residual, x, cos, sin, mask, cache, offloader=offloader)
                x = run_checkpointed(layer.mlp_residual, x, mlp_chunk, offloader=offloader)
            elif where == HOST and placement.kept[i]:   # its attention output parked beside its input
                kept = with_kept_attention(layer, KeptAttention(offloader))
                x = run_checkpointed(kept, x, cos, sin, mask, cache, mlp_chunk, offloader=offloader)
            elif where not in (NONE, HOST) and layer_checkpoint.applies(layer, x):   # one autograd node
                x = layer_checkpoint.checkpointed_layer(layer, x, cos, sin, mask, cache, mlp_chunk)
            elif where != NONE:
                parked = offloader if where == HOST else None
                x = run_checkpointed(layer, x, cos, sin, mask, cache, mlp_chunk, offloader=parked)
            else:   # not checkpointed: each layer's last residual add joins the next norm
                x, pending = layer(x, cos, sin, mask, cache, mlp_chunk, pending=pending, defer=True)
        if cache is not None:
            cache.advance(t)
        return self.model.norm.add_and_normalize(x, pending)[0]

    def embed_with_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                          image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, H] (scaled by the embedding multiplier) whose image placeholder
        positions hold the projected image features, image after image in reading order, as the
        Hugging Face models merge them. The vision tower runs in the model's dtype."""
        c = self.config
        if c.vision is None:
            raise ValueError("pixel_values given to a model without a vision tower")
        x = self.model.embed_tokens(input_ids)
        if c.embedding_multiplier != 1.0:
            x = x * torch.tensor(c.embedding_multiplier, dtype=x.dtype)
        features = self.image_features(pixel_values, image_grid_thw).to(x.dtype)
        slots = input_ids == c.image_token_id
        placeholders, given = int(slots.sum()), features.numel() // features.shape[-1]
        if placeholders != given:
            images = len(image_grid_thw) if image_grid_thw is not None else features.shape[0]
            each = "" if image_grid_thw is not None else f" ({features.shape[1]} each)"
            raise ValueError(f"the batch has {placeholders} image placeholder tokens, its {images} "
                             f"image(s) give {given}{each}")
        return x.masked_scatter(slots[..., None], features)

    def rope_positions(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                       image_grid_thw: torch.Tensor | None) -> torch.Tensor | None:
        """M-RoPE position ids [3, B, T] of a batch with images (models/vision_grid.py), from its
        ordinary positions (arange where not given); None for families without M-RoPE."""
        c = self.config
        if c.mrope_section is None or image_grid_thw is None:
            return None
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return mrope_positions(input_ids, position_ids, image_grid_thw, c.image_token_id,   # type: ignore[arg-type]
                               c.vision.spatial_merge_size)   # type: ignore[union-attr]

    def image_blocks(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Each image's run of tokens where the family lets them see each other both ways
        (`ModelConfig.bidirectional_images`), else None (causal like the text)."""
        if not self.config.bidirectional_images:
            return None
        return image_blocks(input_ids == self.config.image_token_id)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Projected image features [images, image_tokens, H] of preprocessed pixels ([tokens, H]
        for patch grids)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values, image_grid_thw))

    def plan_placement(self, x: torch.Tensor, checkpointed: int, span: int | None = None) -> Placement:
        """Where this forward's checkpointed layer inputs go (`velotune.placement`): with
        `offload_checkpoints`, as many as the host has room for (MemAvailable beyond the reserve,
        plus the offload buffers already held) to pinned host memory, the rest (or the last
        `checkpoints_kept_on_gpu`, when a number) on the GPU; finer pieces, or else kept attention
        outputs (`keep_attention_outputs`), where both the host and the GPU have room for them (the
        GPU's: its free memory less one recomputed layer's working set at this length,
        `models/long_context.working_bytes`). `span`: the longest stretch a token attends over
        (the sequence, or the longest packed document), which decides pieces against kept outputs."""
        tokens = x.shape[0] * x.shape[1]
        offload = self.offloads(tokens) and checkpointed > 0
        room = host_room_bytes() + self.offload_pool.held_bytes if offload else None

        def plan(gpu_room: int | None = None) -> Placement:
            return plan_placement(self.config, tokens, x.element_size(), checkpointed, offload=offload,
                                  host_room=room, kept_on_gpu=self.checkpoints_kept_on_gpu, gpu_room=gpu_room,
                                  keep_attention=keep_attention, seq=span or x.shape[1])
        # The flash kernel a kept output comes from takes 16-bit q, k, v on a GPU (autocast makes them so)
        keep_attention = self.keep_attention_outputs and not (
            x.is_cuda and x.dtype == torch.float32 and not torch.is_autocast_enabled("cuda"))
        self.placement = plan()
        if (max(self.placement.pieces) > 1 or any(self.placement.kept)) and x.is_cuda and not kernels.capturing(x):
            free, _ = torch.cuda.mem_get_info(x.device)
            free += torch.cuda.memory_reserved(x.device) - torch.cuda.memory_allocated(x.device)
            working = working_bytes(self.config, Setup(method="full"), tokens)
            self.placement = plan(free - working - 2 * x.numel() * x.element_size())
        return self.placement

    def offloads(self, tokens: int) -> bool:
        """Whether a training forward of `tokens` tokens parks its checkpointed inputs in host
        memory (`offload_checkpoints`, from `offload_min_tokens` tokens on: see
        `checkpointing.auto_offload_tokens`)."""
        return bool(self.offload_checkpoints) and tokens >= self.offload_min_tokens

    def checkpointed_layers(self, batch: int, seq: int, mlp_chunk: int = 0) -> int:
        """How many decoder layers (the first ones) a training forward of batch x seq checkpoints."""
        mode = parse_checkpointing(self.gradient_checkpointing, "model.gradient_checkpointing")
        if mode is False or not (self.training and torch.is_grad_enabled()):
            return 0
        if mode is True:
            return self.config.num_hidden_layers
        if self.memory_budget is None:
            self.memory_budget = MemoryBudget.of_model(self)
        offload = self.offloads(batch * seq)
        room = host_room_bytes() + self.offload_pool.held_bytes if offload else None
        self.checkpoint_choice = choose_checkpointed_layers(self.config, self.memory_budget, batch, seq,
                                                            offload=offload, mlp_chunk=mlp_chunk,
                                                            host_room=room, kept_on_gpu=self.checkpoints_kept_on_gpu)
        return self.checkpoint_choice.layers

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss and target count; labels are unshifted, -100 is ignored.
        Only target positions go through the output head, except inside a CUDA graph capture:
        selecting them needs their count on the host, so there every position goes through and
        the loss's ignore_index drops the others."""
        targets = labels[:, 1:]
        if kernels.capturing(hidden):
            h, kept = hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        else:
            keep = targets != -100
            h, kept = hidden[:, :-1][keep], targets[keep]
        return kernels.linear_cross_entropy(h, self.lm_head.weight, kept, softcap=self.config.final_logit_softcapping)

    def token_logps_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, T-1] float32 log p(labels[:, t+1] | ..t) (0 where the label is -100), through the head
        a chunk of target positions at a time (models/token_logps.py)."""
        targets = labels[:, 1:]
        keep = targets != -100
        out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        out[keep] = token_logps(hidden[:, :-1][keep], self.lm_head.weight, targets[keep],
                                softcap=self.config.final_logit_softcapping)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0, *,
                 attention_mask: torch.Tensor | None = None, stop_token_ids: list[int] | None = None,
                 pad_token_id: int | None = None, pixel_values: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None, **sampling) -> torch.Tensor:
        """Prompt + generated ids [B, T + n] (greedy at temperature 0). Batched prompts are
        left-padded with `attention_mask`; stop tokens default to the config's EOS. Other keyword
        arguments are `SamplingParams` fields (top_k, top_p, min_p, repetition_penalty, seed).
        `pixel_values`: the prompts' images (vision-language models), as `forward` takes them."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, **sampling)
        return generate_tensor(self, input_ids, params, attention_mask=attention_mask,
                               stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, pixel_values=pixel_values,
                               image_grid_thw=image_grid_thw)
