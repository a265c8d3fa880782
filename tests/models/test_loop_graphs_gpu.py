"""A user's own training loop on a GPU (models/loop_graphs.py): with the model's default
`cuda_graphs` its repeated shapes (rows at their bucket width) replay captured graphs, and training
ends where the same loop with graphs off ends: bit for bit on one unpadded shape whose every label
trains, within rounding with masked labels, several shapes, rows of every length in one bucket,
the embedding table in host memory, and when two forwards are summed before one backward (the
second then runs eagerly)."""
from __future__ import annotations

import pytest
import torch

from velotune.lora import LoraConfig, apply_lora, lora_named_parameters
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer

pytestmark = pytest.mark.gpu
VOCAB = 512


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def model(graphs: bool, host_table: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    with torch.device("cuda"):
        m = Transformer(cfg).to(torch.bfloat16)
    m.gradient_checkpointing = True
    apply_lora(m, LoraConfig(r=8, alpha=16), dtype=torch.float32)
    if host_table:
        assert m.put_embeddings_on_host(True)
    m.cuda_graphs = graphs
    return m.train()


def batch(rows: int, length: int, seed: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    if masked:
        labels[:, : length // 3] = -100
    return ids.cuda(), labels.cuda()


def train(m: Transformer, batches, summed: bool = False):
    """A user's loop: zero_grad(set_to_none), forward, loss.backward(), AdamW; `summed`: two
    micro-batches' losses added before one backward."""
    params = [p for _, p in lora_named_parameters(m)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    step = 2 if summed else 1
    for i in range(0, len(batches), step):
        opt.zero_grad(set_to_none=True)
        outs = [m(ids, labels=labels, attention_mask=mask[0] if mask else None)   # the default call
                for ids, labels, *mask in batches[i:i + step]]
        loss = sum(out.loss for out in outs)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).float().cpu(), {n: p.detach().clone() for n, p in lora_named_parameters(m)}


def assert_close(graphed, eager, rel: float = 1e-3):
    (g_losses, g_w), (e_losses, e_w) = graphed, eager
    assert torch.allclose(g_losses, e_losses, rtol=rel), (g_losses, e_losses)
    for name, w in e_w.items():
        assert ((g_w[name] - w).norm() / w.norm()).item() < rel, name


def test_one_shape_replays_bit_for_bit():
    data = [batch(2, 256, seed=0, masked=False)] * 6   # a bucket width itself: nothing padded
    graphed = model(True)
    g_losses, g_w = train(graphed, data)
    e_losses, e_w = train(model(False), data)
    # the first call of the shape runs eagerly, the second captures and replays, the rest replay
    assert graphed.loop_graphs.replays == 5 and len(graphed.loop_graphs.pairs) == 1, graphed.loop_graphs.describe()
    assert torch.equal(g_losses, e_losses)
    assert all(torch.equal(g_w[n], w) for n, w in e_w.items())


def test_masked_labels_and_several_shapes_match_the_eager_loop():
    shapes = [(2, 40), (1, 64), (2, 40), (1, 64), (3, 24), (2, 40), (1, 64), (3, 24)]
    data = [batch(r, t, seed=i, masked=True) for i, (r, t) in enumerate(shapes)]
    graphed = model(True)
    result = train(graphed, data)
    assert graphed.loop_graphs.replays == 5 and len(graphed.loop_graphs.pairs) == 3, graphed.loop_graphs.describe()
    assert_close(result, train(model(False), data))


def test_rows_of_every_length_in_one_bucket_replay_one_graph():
    data = [batch(1, t, seed=i, masked=True) for i, t in enumerate([40, 57, 100, 200, 255, 130])]
    graphed = model(True)
    result = train(graphed, data)
    assert graphed.loop_graphs.replays == 5 and len(graphed.loop_graphs.pairs) == 1, graphed.loop_graphs.describe()
    assert_close(result, train(model(False), data))


def padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `lengths` padded on the right to the longest, as a collator with a tokenizer pads:
    (ids, labels -100 on the padding, attention mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.cuda(), labels.cuda(), mask.cuda()


def test_padded_batches_with_their_masks_replay():
    data = [padded(lengths, seed=i) for i, lengths in
            enumerate([[90, 40, 77], [120, 120, 3], [200, 31, 150], [77, 77, 76], [150, 9, 100]])]
    graphed = model(True)
    result = train(graphed, data)
    assert graphed.loop_graphs.replays == 4 and len(graphed.loop_graphs.pairs) == 1, graphed.loop_graphs.describe()
    assert next(iter(graphed.loop_graphs.pairs.values())).mask is not None
    assert_close(result, train(model(False), data))


def test_the_embedding_table_in_host_memory():
    data = [batch(2, 40, seed=i, masked=True) for i in range(5)]
    graphed = model(True, host_table=True)
    result = train(graphed, data)
    assert graphed.loop_graphs.replays == 4
    embeds = next(iter(graphed.loop_graphs.pairs.values())).embeds
    assert embeds is not None and embeds.data_ptr() == graphed.loop_graphs.embeds.data_ptr()   # the shared rows
    assert_close(result, train(model(False, host_table=True), data))


def test_two_forwards_before_one_backward_run_the_second_eagerly():
    data = [batch(2, 40, seed=i, masked=True) for i in range(8)]
    graphed = model(True)
    result = train(graphed, data, summed=True)
    # eager (first sight) + captured and replayed, then three times replayed + eager (the first waits)
    assert graphed.loop_graphs.replays == 4, graphed.loop_graphs.describe()
    assert_close(result, train(model(False), data, summed=True))


def test_a_loss_dropped_without_backward_lets_the_next_forward_replay():
    m = model(True)
    ids, labels = batch(2, 40, seed=0, masked=False)
    for _ in range(2):   # eager, then captured and replayed
        m(ids, labels=labels).loss.backward()
    m(ids, labels=labels)   # a loss nobody backpropagates (an evaluation in train mode)
    out = m(ids, labels=labels)
    assert m.loop_graphs.replays == 3 and out.hidden_states is None
    out.loss.backward()
    assert m.loop_graphs.turn is None


def test_a_tokenizers_mask_of_ones_replays():
    m = model(True)
    ids, labels = batch(2, 40, seed=0, masked=False)
    for _ in range(3):   # model(**batch) with an unpadded batch's attention mask
        m(ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    assert m.loop_graphs.replays == 2, m.loop_graphs.describe()


def test_a_data_loader_pinning_memory_beside_the_capture():
    """A user's DataLoader(pin_memory=True) pins the next batches in a thread of its own while the
    loop captures: the capture must not fail for it."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    rows = TensorDataset(torch.randint(0, VOCAB, (24, 100), generator=g))
    m = model(True)
    for (ids,) in DataLoader(rows, batch_size=2, pin_memory=True, num_workers=1):
        ids = ids.cuda(non_blocking=True)
        m(ids, labels=ids).loss.backward()
    assert m.loop_graphs.replays == 11, m.loop_graphs.describe()
