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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from velotune import kernels
from velotune.infer.cache import KVCache
from velotune.infer.engine import generate_tensor
from velotune.infer.sampling import SamplingParams
from velotune.lora import fused as lora_fused
from velotune.models import host_embedding
from velotune.models.checkpointing import (
    CheckpointChoice,
    MemoryBudget,
    choose_checkpointed_layers,
    parked_per_token,
    parse_checkpointing,
    recomputing,
    run_checkpointed,
)
from velotune.models.config import ModelConfig
from velotune.models.masks import attention_mask_for, document_ids
from velotune.models.offload import LayerInputOffloader, OffloadStats, PinnedHostPool, host_has_room
from velotune.models.tiled_mlp import mlp_chunk_size, tiled_mlp
from velotune.models.token_logps import token_logps


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None        # summed token losses (for exact accumulation)
    num_targets: torch.Tensor | None = None     # tokens that contributed to loss_sum
    hidden_states: torch.Tensor | None = None   # final-norm output, [B, T, H]
    token_logps: torch.Tensor | None = None     # [B, T-1] log p(labels[:, 1:]), 0 where ignored


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        # Gemma stores w and scales by (1 + w): its neutral weight is zero.
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.offset)

    def add_and_normalize(self, residual: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + delta), residual + delta) in one pass (`kernels.add_rms_norm`): a
        residual add fused with the norm that reads its sum. No delta: (norm(residual), residual)."""
        if delta is None:
            return self(residual), residual
        return kernels.add_rms_norm(delta, residual, self.weight, self.eps, self.offset)


class Rotary(nn.Module):
    """cos/sin tables for per-token position ids (so packed sequences restart cleanly)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config).to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's frequency-dependent scaling or linear scaling."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None, output_needed: bool = True) -> torch.Tensor:
        """`output_needed=False`: the output projection saves its input but is not run (see
        `lora_fused.project`); for a recomputation whose output is thrown away."""
        q, k, v = self.project(x)
        return self.attend_and_project(q, k, v, cos, sin, mask, cache, output_needed)

    def project(self, x: torch.Tensor, output_needed: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, T, heads x head_dim] before RoPE (one fused block under LoRA);
        `output_needed=False` as in `forward`, for the projections' base matmuls."""
        return lora_fused.project(x, self.q_proj, self.k_proj, self.v_proj, output_needed=output_needed)

    def attend_and_project(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None,
                           output_needed: bool = True) -> torch.Tensor:
        """The rest of `forward` from the projections' outputs: q/k norms, RoPE, attention, o_proj."""
        b, t, _ = q.shape
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = kernels.apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.attend(q, k, v, mask)
        attended = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return lora_fused.project(attended, self.o_proj, output_needed=output_needed)[0]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        causal = mask is None and q.shape[2] > 1
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
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, off)
        # Llama-style: post_attention_layernorm is the norm before the MLP. Gemma 2 ("sandwich"):
        # it normalises the attention output, and two more norms wrap the MLP.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, off)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, off)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None, mlp_chunk: int = 0,
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
                           mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
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
                         sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """attention(q, k, v) through o_proj: what the residual stream adds."""
        return self.self_attn.attend_and_project(q, k, v, cos, sin, mask, output_needed=not recomputing())

    def mlp_residual(self, x: torch.Tensor, mlp_chunk: int = 0) -> torch.Tensor:
        """x + mlp(norm(x))."""
        normed = self.post_attention_layernorm(x)
        return x + tiled_mlp(self.mlp, normed, mlp_chunk, output_needed=not recomputing())


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weight_offset)
        self.rotary = Rotary(config)


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
        self.checkpoints_kept_on_gpu = 0                   # ...except the last N (when host memory binds)
        self.mlp_chunk_tokens: int | None = None           # None: tile long inputs; 0: never; N: chunks of N
        self.memory_budget: MemoryBudget | None = None     # for "auto"; None: this device, AdamW states
        self.checkpoint_choice: CheckpointChoice | None = None   # what "auto" chose for the last forward
        self.offload_stats = OffloadStats()                # what the last forward's offload moved
        self.offload_pool = PinnedHostPool()               # its host buffers, reused from step to step
        self.max_seq_length = config.max_position_embeddings
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
        return_logits: bool = True,
        inputs_embeds: torch.Tensor | None = None,
        return_token_logps: bool = False,
    ) -> ModelOutput:
        """`inputs_embeds` [B, T, H], when given, replaces the embedding lookup of `input_ids` (the
        CUDA-graph step looks up a host-memory table outside its graph: train/graphed_step.py).
        With labels, `return_token_logps` gives each target's log-probability (`token_logps`)
        instead of the summed loss: what the preference and RL objectives read."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        out = ModelOutput(hidden_states=hidden)
        if labels is not None and return_token_logps:
            out.token_logps = self.token_logps_from_hidden(hidden, labels)
        elif labels is not None:
            out.loss_sum, out.num_targets = self.loss_from_hidden(hidden, labels)
            out.loss = out.loss_sum / out.num_targets.clamp(min=1)
        if return_logits:
            out.logits = self.logits_from_hidden(hidden)
        return out

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, H]."""
        c = self.config
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        # Only caller-given positions can hold packed documents. Generated ones are never tested:
        # inside a CUDA graph capture the test cannot run, and the ids it then builds would turn
        # plain causal attention into a masked one (3x slower in cuDNN on an H100).
        docs = None
        if position_ids is None:
            position_ids = torch.arange(offset, offset + t, device=input_ids.device).expand(b, t)
        elif cache is None and attention_mask is None:
            docs = document_ids(position_ids)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if c.embedding_multiplier != 1.0:
            x = x * torch.tensor(c.embedding_multiplier, dtype=x.dtype)
        cos, sin = self.model.rotary(position_ids, x.dtype)
        masks = {
            window: attention_mask_for(t, offset, attention_mask, docs, window, x.device)
            for window in {c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)}
        }
        mlp_chunk = mlp_chunk_size(self.mlp_chunk_tokens, b * t)
        checkpointed = self.checkpointed_layers(b, t, mlp_chunk)
        offloader, offloaded, pieces = None, 0, 1   # the first `offloaded` layers park their inputs
        if self.offload_checkpoints and checkpointed:
            self.offload_stats = OffloadStats()
            offloaded = max(checkpointed - self.checkpoints_kept_on_gpu, 0)
            pieces = self.checkpoint_pieces(x, offloaded)
            offloader = LayerInputOffloader(x.device, self.offload_stats, self.offload_pool,
                                            planned=offloaded * {1: 1, 2: 2, 3: 5}[pieces])
        pending = None   # the last layer's MLP (or post-norm) output, not yet added to x
        for i, layer in enumerate(self.model.layers):
            mask = masks[c.sliding_window if c.is_sliding(i) else None]
            if i < offloaded and pieces == 3:
                q, k, v = run_checkpointed(layer.attention_inputs, x, offloader=offloader)
                x = x + run_checkpointed(layer.attention_output, q, k, v, cos, sin, mask, offloader=offloader,
                                         parked=3)
                del q, k, v
                x = run_checkpointed(layer.mlp_residual, x, mlp_chunk, offloader=offloader)
            elif i < offloaded and pieces == 2:
                x = run_checkpointed(layer.attention_residual, x, cos, sin, mask, cache, offloader=offloader)
                x = run_checkpointed(layer.mlp_residual, x, mlp_chunk, offloader=offloader)
            elif i < checkpointed:
                parked = offloader if i < offloaded else None
                x = run_checkpointed(layer, x, cos, sin, mask, cache, mlp_chunk, offloader=parked)
            else:   # not checkpointed: each layer's last residual add joins the next norm
                x, pending = layer(x, cos, sin, mask, cache, mlp_chunk, pending=pending, defer=True)
        if cache is not None:
            cache.advance(t)
        return self.model.norm.add_and_normalize(x, pending)[0]

    def checkpoint_pieces(self, x: torch.Tensor, offloaded: int) -> int:
        """In how many pieces each of the `offloaded` layers is checkpointed: 3 (q/k/v projections;
        attention through o_proj; MLP half, see `DecoderLayer.attention_inputs`), 2 (attention
        half, MLP half, see `DecoderLayer.attention_residual`) or 1 (whole). Finer pieces let the
        recomputation skip more matmuls but park more per layer in pinned host memory (3: the
        input, q, k, v and the residual between the halves; 2: two inputs), so each is taken only
        when the host has room (`offload.host_has_room`): a 350,000-token 8B run parks 85 GiB as
        whole layers. Sandwich norms (Gemma 2) read the MLP's output, so those layers stay whole."""
        if self.config.sandwich_norms or not offloaded:
            return 1
        input_bytes = x.numel() * x.element_size()
        if host_has_room(self.offload_pool, offloaded, input_bytes * parked_per_token(self.config) //
                         self.config.hidden_size):
            return 3
        return 2 if host_has_room(self.offload_pool, 2 * offloaded, input_bytes) else 1

    def checkpointed_layers(self, batch: int, seq: int, mlp_chunk: int = 0) -> int:
        """How many decoder layers (the first ones) a training forward of batch x seq checkpoints."""
        mode = parse_checkpointing(self.gradient_checkpointing, "model.gradient_checkpointing")
        if mode is False or not (self.training and torch.is_grad_enabled()):
            return 0
        if mode is True:
            return self.config.num_hidden_layers
        if self.memory_budget is None:
            self.memory_budget = MemoryBudget.of_model(self)
        self.checkpoint_choice = choose_checkpointed_layers(self.config, self.memory_budget, batch, seq,
                                                            offload=self.offload_checkpoints, mlp_chunk=mlp_chunk)
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
                 pad_token_id: int | None = None, **sampling) -> torch.Tensor:
        """Prompt + generated ids [B, T + n] (greedy at temperature 0). Batched prompts are
        left-padded with `attention_mask`; stop tokens default to the config's EOS. Other keyword
        arguments are `SamplingParams` fields (top_k, top_p, min_p, repetition_penalty, seed)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, **sampling)
        return generate_tensor(self, input_ids, params, attention_mask=attention_mask,
                               stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)
