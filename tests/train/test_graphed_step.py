"""CUDA-graph micro-steps (train/graphed_step.py): the same losses and gradients as the eager
forward + backward, through accumulation, zero_grad(set_to_none=True), packed batches and a
capture that fails; and the refusals that keep graphs away from what they cannot replay."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.train_helpers import load_tiny, make_examples
from velotune import load_model
from velotune.data import Example
from velotune.data.batching import collate_packed
from velotune.widths import bucket_width
from velotune.lora import LoraConfig, apply_lora, lora_named_parameters
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.train.config import TrainConfig, TrainConfigError
from velotune.models.loop_graphs import graph_blockers
from velotune.train.graphed_step import GraphedMicroStep
from velotune.train.trainer import Trainer

VOCAB = 257


def small_model(device: str, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=96, intermediate_size=200,
                      num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    with torch.device(device):
        model = Transformer(cfg)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.gradient_checkpointing = True
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout), dtype=torch.float32)
    return model.train()


def test_blockers_name_dropout():
    model = small_model("cpu", dropout=0.1)
    reasons = " | ".join(graph_blockers(model))
    assert "dropout" in reasons and "lora_dropout" in reasons
    assert not [r for r in graph_blockers(small_model("cpu")) if "dropout" in r]


def test_unpacked_batches_keep_plain_causal_attention_inside_a_capture(monkeypatch):
    """Inside a capture the packed-document test cannot run; a batch given no position ids must
    still attend causally without a mask (a built mask made cuDNN attention 3x slower on an H100)."""
    import velotune.models.masks as masks
    from velotune.models.transformer import Attention

    monkeypatch.setattr(masks, "capturing", lambda tensor: True)
    seen = []
    plain_attend = Attention.attend
    monkeypatch.setattr(Attention, "attend", lambda self, q, k, v, mask: seen.append(mask) or plain_attend(self, q, k, v, mask))
    import velotune.models.transformer as transformer

    monkeypatch.setattr(transformer.kernels, "capturing", lambda tensor: True)
    model = small_model("cpu")
    ids = torch.randint(0, VOCAB, (2, 9))
    model(ids)
    assert seen and all(m is None for m in seen)
    seen.clear()
    # packed without spans: inside a capture the documents cannot be counted, so they are masked
    model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]] * 2))
    assert seen and all(m is not None for m in seen)


def test_packed_positions_outside_a_capture_become_document_spans(monkeypatch):
    """Eagerly, restarting positions are read as document spans and attention runs per document
    (kernels.varlen_attention), never over a [tokens x tokens] mask."""
    from velotune.models import transformer

    spans = []
    plain = transformer.kernels.varlen_attention
    monkeypatch.setattr(transformer.kernels, "varlen_attention",
                        lambda q, k, v, cu, max_len, scale, window: spans.append((cu.tolist(), max_len))
                        or plain(q, k, v, cu, max_len, scale, window))
    model = small_model("cpu")
    ids = torch.randint(0, VOCAB, (2, 9))
    model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]]))
    assert spans and all(s == ([0, 5, 9, 18], 9) for s in spans)


def test_trainer_cuda_graphs_true_says_what_blocks_it(tiny_model_dir, tmp_path):
    config = TrainConfig(method="full", output_dir=str(tmp_path / "run"), cuda_graphs=True)
    with pytest.raises(TrainConfigError, match="'cuda_graphs'.*training runs on cpu"):
        Trainer(load_tiny(tiny_model_dir("llama")), config, make_examples(4, seed=1), show_progress=False)
    auto = Trainer(load_tiny(tiny_model_dir("llama")), TrainConfig(method="full", output_dir=str(tmp_path / "b")),
                   make_examples(4, seed=1), show_progress=False)
    assert auto.graphed is None


@pytest.mark.gpu
def test_a_graphed_trainer_offloads_checkpoints_by_default(tiny_model_dir, tmp_path):
    """`offload_checkpoints: auto` offloads the checkpointed inputs of a graphed run (the replay
    pays none of its host work) and leaves them on the GPU in an eager run that fits."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def trainer(name: str, **keys) -> Trainer:
        model, _ = load_model(tiny_model_dir("llama"), dtype=torch.bfloat16, device="cuda")
        config = TrainConfig(method="full", gradient_checkpointing=True, output_dir=str(tmp_path / name), **keys)
        return Trainer(model, config, make_examples(8, seed=1), show_progress=False)

    graphed = trainer("graphed")
    assert graphed.graphed is not None and graphed.model.offload_checkpoints is True
    eager = trainer("eager", cuda_graphs=False)
    assert eager.graphed is None and eager.model.offload_checkpoints is False


def test_collate_packed_fixed_width_pads_and_refuses_overflow():
    rows = [[Example([1, 2, 3], [1, 2, 3])], [Example([4, 5], [4, 5]), Example([6], [6])]]
    batch = collate_packed(rows, pad_id=0, width=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]   # padding is its own document
    assert (batch["labels"][:, 3:] == -100).all()
    with pytest.raises(ValueError, match="width=2"):
        collate_packed(rows, pad_id=0, width=2)


def eager_micro_step(model, ids, labels, positions, scale):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, position_ids=positions, labels=labels, return_logits=False)
    (out.loss_sum.float() * scale).backward()
    return out.loss_sum.float().detach()


def batches(packed: bool):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (2, 45), generator=g)
        labels = ids.clone()
        labels[:, :7] = -100      # a prompt that is not trained on
        positions = torch.arange(45).expand(2, 45).clone()
        if packed:
            positions[0, 20:] = torch.arange(25)   # a second document in row 0
        out.append((ids, labels, positions))
    return out


def train(graphed: bool, packed: bool, host_table: bool = False, offload: bool = False):
    model = small_model("cuda")
    model.offload_checkpoints = offload
    if host_table:
        assert model.put_embeddings_on_host(True)
    params = [p for _, p in lora_named_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    step = GraphedMicroStep(model, params, amp_dtype=torch.bfloat16) if graphed else None
    losses = []
    data = batches(packed)
    for i in range(0, len(data) * 2, 2):   # 4 optimizer steps of 2 micro-batches each
        pair = [data[i % len(data)], data[(i + 1) % len(data)]]
        scale = 1.0 / sum(int((lab[:, 1:] != -100).sum()) for _, lab, _ in pair)
        total = torch.zeros((), device="cuda")
        for ids, labels, positions in pair:
            if step is not None:
                total += step(ids, labels, positions, scale)
            else:
                total += eager_micro_step(model, ids.cuda(), labels.cuda(), positions.cuda(), scale)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total) * scale)
    return losses, {n: p.detach().clone() for n, p in lora_named_parameters(model)}, step


def assert_matches_eager(graph_losses, graph_w, eager_losses, eager_w):
    """Replayed training ends where eager training does: losses within 0.2% at every optimizer
    step, adapters within 2% relative norm (bf16 rounding differs between the two orders of work)."""
    for a, b in zip(graph_losses, eager_losses):
        assert abs(a - b) <= 2e-3 * abs(b), (graph_losses, eager_losses)
    for name, w in eager_w.items():
        rel = ((graph_w[name] - w).norm() / w.norm()).item()
        assert rel < 2e-2, f"{name}: {rel:.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_replayed_steps_match_eager(packed):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    eager_losses, eager_w, _ = train(False, packed)
    graph_losses, graph_w, step = train(True, packed)
    assert step.replays >= 4, step.describe()
    assert "micro-batch shapes replayed" in step.describe()
    assert_matches_eager(graph_losses, graph_w, eager_losses, eager_w)


@pytest.mark.gpu
def test_replayed_steps_with_the_embedding_table_in_host_memory():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    eager_losses, eager_w, _ = train(False, False)
    graph_losses, graph_w, step = train(True, False, host_table=True)
    assert step.replays >= 4, step.describe()
    assert step.shapes[(2, 45, False, -1, 0)].embeds is not None
    assert_matches_eager(graph_losses, graph_w, eager_losses, eager_w)


@pytest.mark.gpu
def test_replayed_steps_with_checkpoints_offloaded_to_host_memory():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    eager_losses, eager_w, _ = train(False, False, offload=True)
    graph_losses, graph_w, step = train(True, False, offload=True)
    assert step.replays >= 4, step.describe()
    entry = step.shapes[(2, 45, False, -1, 0)]
    parked = 5 * step.model.config.num_hidden_layers    # three pieces per layer: input, q, k, v, residual
    # the graph holds one pinned buffer per checkpointed input, which nothing else may lease
    assert len(entry.host_buffers) == parked and all(b.in_use and b.pinned for b in entry.host_buffers)
    assert step.model.offload_stats.offloaded == parked
    assert_matches_eager(graph_losses, graph_w, eager_losses, eager_w)


def flat_training(graphed: bool, lengths_per_step, offload: bool = False):
    """Optimizer steps of two padding-free micro-batches each, of varying lengths, bucketed to
    graph widths (as the trainer collates them on a GPU); returns losses, adapters, the step."""
    from velotune.data.batching import IGNORE_INDEX
    from velotune.train.data import MicroBatches
    from velotune.train.sft import batch_documents

    g = torch.Generator().manual_seed(5)
    examples = []
    for n in [length for step in lengths_per_step for length in step]:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    batches = MicroBatches(examples, 2, pad_id=0, seed=0, flat=True, bucketed=True, max_seq_length=300)
    model = small_model("cuda")
    model.offload_checkpoints = offload
    params = [p for _, p in lora_named_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    step = (GraphedMicroStep(model, params, amp_dtype=torch.bfloat16, max_shapes=64,
                             max_tokens=bucket_width(2 * 300)) if graphed else None)   # as the trainer sizes it
    losses, cursor = [], 0
    for lengths in lengths_per_step * 2:       # every width seen again: warm-up, then capture, replay
        micro = []
        for i in range(0, len(lengths), 2):
            micro.append(batches.collate([(cursor + j) % len(examples) for j in range(i, min(i + 2, len(lengths)))]))
        cursor += len(lengths)
        scale = 1.0 / sum(b["num_target_tokens"] for b in micro)
        total = torch.zeros((), device="cuda")
        for b in micro:
            if step is not None:
                total += step(b["input_ids"], b["labels"], b["position_ids"], scale, cu_seqlens=b["cu_seqlens"],
                              max_document_length=b["max_document_length"])
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(b["input_ids"].cuda(), position_ids=b["position_ids"].cuda(),
                                labels=b["labels"].cuda(), return_logits=False,
                                documents=batch_documents(b, torch.device("cuda")))
                (out.loss_sum.float() * scale).backward()
                total += out.loss_sum.float().detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total) * scale)
    return losses, {n: p.detach().clone() for n, p in lora_named_parameters(model)}, step


@pytest.mark.gpu
def test_variable_length_padding_free_steps_replay_as_eager():
    """Rows of many lengths, padding-free and bucketed: a few captured widths serve every step and
    training ends where eager training does."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lengths = [[17, 250, 3, 90], [120, 40, 300, 7], [64, 64, 64, 64], [9, 280, 150, 33]]
    eager_losses, eager_w, _ = flat_training(False, lengths)
    graph_losses, graph_w, step = flat_training(True, lengths)
    widths = {key[1] for key in step.shapes}
    assert widths <= {256, 512} and step.replays >= 8, step.describe()
    assert all(key[0] == 1 and key[3] > 0 for key in step.shapes)   # one flat row, offsets as a buffer
    assert_matches_eager(graph_losses, graph_w, eager_losses, eager_w)


@pytest.mark.gpu
def test_variable_length_steps_with_offloaded_checkpoints_share_host_buffers():
    """Offloaded checkpoints under graphs of several widths: later captures, and the eager
    warm-ups of later widths, lease the buffers earlier graphs hold, so host memory is the one
    set the first warm-up pinned (sized for the longest micro-batch), and training still matches
    eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lengths = [[17, 250, 3, 90], [120, 40, 300, 7], [64, 64, 64, 64], [9, 280, 150, 33]]
    eager_losses, eager_w, _ = flat_training(False, lengths, offload=True)
    graph_losses, graph_w, step = flat_training(True, lengths, offload=True)
    captured = [e for e in step.shapes.values() if e.graph is not None]
    assert len(captured) >= 2 and step.replays >= 8, step.describe()
    held = {id(b) for e in captured for b in e.host_buffers}
    assert len(held) < sum(len(e.host_buffers) for e in captured)   # shared, not one set per width
    pool = step.model.offload_pool
    assert all(b.graph_held for b in pool.buffers)      # no set pinned for a warm-up alone
    assert len(pool.buffers) == max(len(e.host_buffers) for e in captured)
    assert_matches_eager(graph_losses, graph_w, eager_losses, eager_w)


FAILING_CAPTURE = """
import torch
from tests.train.test_graphed_step import batches, small_model
from velotune.lora import lora_named_parameters
from velotune.train.graphed_step import GraphCaptureError, GraphedMicroStep

model = small_model("cuda")
def syncing_hook(module, args, out):   # a host sync; returns None, so the output is unchanged
    float(out.detach().float().sum())

model.model.norm.register_forward_hook(syncing_hook)
step = GraphedMicroStep(model, [p for _, p in lora_named_parameters(model)], amp_dtype=torch.bfloat16)
ids, labels, positions = batches(False)[0]
step(ids, labels, positions, 1.0)   # eager warm-up: host syncs are fine there
try:
    step(ids, labels, positions, 1.0)
except GraphCaptureError as error:
    print("REFUSED:", error)
"""


@pytest.mark.gpu
def test_failed_capture_stops_with_the_cause_and_the_key():
    """In its own process: a failed capture has left later CUDA work in the process wrong."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", FAILING_CAPTURE], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'src'}"}, timeout=300)
    assert "REFUSED: CUDA graph capture of the training step failed" in done.stdout, done.stderr[-2000:]
    assert "cuda_graphs: false" in done.stdout
