"""DDP with 2 processes on the gloo backend (CPU): the distributed path gives the gradients and
losses of one process seeing the whole batch, with the loss normalised by the global count of
target tokens."""
from __future__ import annotations

import os

import pytest
import torch

from velotune import distributed
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from tests.distributed.gloo_helpers import run_on_ranks

STEPS = 4


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Transformer(cfg)


def data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (STEPS, 4, 9), generator=g)
    labels = ids.clone()
    labels[:, 0, :6] = -100   # uneven target counts across rows and ranks
    labels[:, 3, :2] = -100
    return ids, labels


def train(world: distributed.World, rows: list[int]) -> list[float]:
    model = tiny_model()
    wrapped = distributed.wrap_ddp(model, world) if world.distributed else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, labels = data()
    losses = []
    for step in range(STEPS):
        x, y = ids[step, rows], labels[step, rows]
        local_targets = (y[:, 1:] != -100).sum()
        total = distributed.global_sum(local_targets)
        out = wrapped(x, labels=y, return_logits=False)
        loss = out.loss_sum / total * distributed.loss_scale(world, world.distributed)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(distributed.global_sum(out.loss_sum.detach()) / total))
    return losses


def worker(out_dir: str) -> None:
    world = distributed.setup("gloo")
    losses = train(world, distributed.rank_rows(list(range(4)), world))
    torch.save(losses, os.path.join(out_dir, f"rank{world.rank}.pt"))


def test_two_rank_ddp_equals_one_process(tmp_path):
    single = train(distributed.World(), list(range(4)))
    run_on_ranks(2, worker, str(tmp_path))
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0 == rank1
    assert rank0 == pytest.approx(single, rel=1e-5)
    assert single[-1] < single[0]


def test_rank_rows_are_disjoint_and_equal_sized():
    worlds = [distributed.World(rank=r, world_size=3) for r in range(3)]
    shares = [distributed.rank_rows(list(range(10)), w) for w in worlds]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert sorted(sum(shares, [])) == list(range(9))


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = distributed.setup()
    assert world == distributed.World() and world.is_main and not world.distributed
    assert distributed.global_sum(torch.tensor(3)).item() == 3
