"""Exact accumulation and packing: the trainer's step over k micro-batches, or over packed rows,
gives the loss and gradients of one padded batch holding the same examples."""
from __future__ import annotations

import torch

from tests.train.train_helpers import load_tiny, make_examples
from velotune.data import collate_packed, collate_padded, pack_examples
from velotune.train.config import TrainConfig
from velotune.train.trainer import Trainer


def step_grads(trainer: Trainer, micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.accumulate(micro_batches)
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def make_trainer(folder, tmp_path, examples) -> Trainer:
    config = TrainConfig(method="full", output_dir=str(tmp_path / "run"), micro_batch_size=2)
    return Trainer(load_tiny(folder), config, examples, show_progress=False)


def assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert abs(a[0] - b[0]) <= 1e-6 * abs(b[0])
    assert a[1].keys() == b[1].keys() and len(a[1]) > 10
    for name in a[1]:
        err = (a[1][name] - b[1][name]).norm() / b[1][name].norm()
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"


def test_four_micro_batches_of_two_equal_one_batch_of_eight(tiny_model_dir, tmp_path):
    examples = make_examples(8, seed=1)
    trainer = make_trainer(tiny_model_dir("llama"), tmp_path, examples)
    whole = step_grads(trainer, [collate_padded(examples, 0)])
    split = step_grads(trainer, [collate_padded(examples[i:i + 2], 0) for i in range(0, 8, 2)])
    assert_same(split, whole)


def test_packed_rows_equal_padded_batch(tiny_model_dir, tmp_path):
    examples = make_examples(8, seed=2)
    trainer = make_trainer(tiny_model_dir("qwen2"), tmp_path, examples)
    padded = step_grads(trainer, [collate_padded(examples, 0)])
    rows = pack_examples(examples, 48)
    assert len(rows) < len(examples)          # several examples really share a row
    packed = step_grads(trainer, [collate_packed(rows, 0)])
    assert_same(packed, padded)


def flat_batches(examples, micro: int, *, bucketed: bool):
    from velotune.train.data import MicroBatches

    batches = MicroBatches(examples, micro, pad_id=0, seed=0, flat=True, bucketed=bucketed, max_seq_length=24)
    return [batches.collate(list(range(i, min(i + micro, len(examples))))) for i in range(0, len(examples), micro)]


def test_padding_free_micro_batches_equal_the_padded_batch(tiny_model_dir, tmp_path):
    """Rows laid end to end (no padding; attention per document through kernels.varlen_attention),
    also bucketed to a graph's width with pad documents and empty offset slots, give the padded
    batch's summed loss and gradients."""
    examples = make_examples(8, seed=3)
    trainer = make_trainer(tiny_model_dir("llama"), tmp_path, examples)
    padded = step_grads(trainer, [collate_padded(examples, 0)])
    exact = flat_batches(examples, 3, bucketed=False)
    assert all(b["input_ids"].shape[0] == 1 and (b["input_ids"] != 0).all() for b in exact)   # no pad token
    assert_same(step_grads(trainer, exact), padded)
    bucketed = flat_batches(examples, 3, bucketed=True)
    assert all(b["input_ids"].shape[1] == 256 for b in bucketed)                 # padded to the bucket
    assert any(int(b["cu_seqlens"][-2]) == int(b["cu_seqlens"][-1]) for b in bucketed)   # an empty slot
    assert_same(step_grads(trainer, bucketed), padded)


def test_padding_free_batches_equal_unpadded_rows_one_by_one(tiny_model_dir, tmp_path):
    """The loss of a padding-free micro-batch is the sum of each row's own loss computed alone."""
    examples = make_examples(5, seed=4)
    model = load_tiny(tiny_model_dir("qwen2"))
    [batch] = flat_batches(examples, 5, bucketed=True)
    from velotune.train.sft import batch_documents

    together = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     documents=batch_documents(batch, torch.device("cpu")), return_logits=False).loss_sum.detach()
    alone = sum(model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]), return_logits=False).loss_sum.detach()
                for e in examples)
    assert abs(float(together) - float(alone)) <= 1e-5 * abs(float(alone))


def test_packed_rows_laid_flat_and_bucketed_equal_the_padded_batch(tiny_model_dir, tmp_path):
    """packing: true on a GPU: packed rows of a micro-batch laid end to end, bucketed for graphs."""
    from velotune.train.data import MicroBatches

    examples = make_examples(10, seed=5)
    trainer = make_trainer(tiny_model_dir("llama"), tmp_path, examples)
    padded = step_grads(trainer, [collate_padded(examples, 0)])
    batches = MicroBatches(examples, 2, pad_id=0, seed=0, packing=True, flat=True, bucketed=True, max_seq_length=40)
    assert len(batches.rows) < len(examples)                     # several examples share a packed row
    flat = [batches.collate(list(range(i, min(i + 2, len(batches.rows))))) for i in range(0, len(batches.rows), 2)]
    assert all(b["input_ids"].shape == (1, 256) for b in flat)
    assert_same(step_grads(trainer, flat), padded)


def test_padding_free_needs_a_head_size_the_flash_kernel_takes():
    """A flat batch's attention must run in the flash kernel on a GPU: the reference reads document
    offsets on the host, which failed the CUDA graph capture of a model with 12-wide heads."""
    from velotune.models.config import ModelConfig
    from velotune.models.transformer import Transformer
    from velotune.train.sft import padding_free

    def model(head_dim: int) -> Transformer:
        return Transformer(ModelConfig(model_type="llama", vocab_size=32, hidden_size=4 * head_dim,
                                       intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=head_dim))

    cuda = torch.device("cuda")
    assert padding_free(model(16), cuda, torch.bfloat16)
    assert not padding_free(model(12), cuda, torch.bfloat16)
    assert not padding_free(model(16), torch.device("cpu"), torch.bfloat16)
