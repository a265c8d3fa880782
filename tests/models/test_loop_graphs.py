"""A user's own training loop replayed as CUDA graphs (models/loop_graphs.py), on the CPU: which
calls run eagerly and why, what invalidates a captured shape, how the `.grad` buffers behave, and
the bookkeeping that keeps one replayed forward's saved tensors from being overwritten before its
backward (driven through the replay Function with stand-in graphs). The replays themselves, against
the eager loop, are in test_loop_graphs_gpu.py."""
from __future__ import annotations

import gc

import pytest
import torch

from velotune.lora import LoraConfig, apply_lora, disable_adapters
from velotune.models import loop_graphs
from velotune.models.config import ModelConfig
from velotune.models.loop_graphs import LoopGraphs, Survey, _Pair, _Replay, _Turn
from velotune.models.transformer import Transformer

VOCAB = 257


def tiny(dropout: float = 0.0, **extra) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, **extra)
    model = Transformer(cfg)
    model.gradient_checkpointing = True
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout), dtype=torch.float32)
    return model.train()


def ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_on_the_cpu_a_training_forward_runs_eagerly_with_every_output():
    model = tiny()
    x = ids()
    first = model(x, labels=x, return_logits=False)
    second = model(x, labels=x, return_logits=False)
    assert model.loop_graphs.replays == 0 and model.loop_graphs.eager_calls == 2
    assert second.hidden_states is not None and torch.equal(first.loss_sum, second.loss_sum)
    assert "the model runs on cpu" in model.loop_graphs.reasons(model, x, x, plain=True)


def reasons_of(model: Transformer, x: torch.Tensor, labels: torch.Tensor | None = None, plain: bool = True) -> str:
    found = [r for r in model.loop_graphs.reasons(model, x, x if labels is None else labels, plain)
             if not r.startswith("the model runs on")]
    return " | ".join(found)


def test_the_reasons_name_what_keeps_a_call_eager(monkeypatch):
    model, x = tiny(), ids()
    assert reasons_of(model, x) == ""
    assert "not a forward of ids, labels and a padding mask alone" in reasons_of(model, x, plain=False)
    model.eval()
    assert "not a training forward" in reasons_of(model, x)
    model.train()
    with torch.no_grad():
        assert "not a training forward" in reasons_of(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast is on" in reasons_of(model, x)
    model.cuda_graphs = False
    assert "model.cuda_graphs is off" in reasons_of(model, x)
    model.cuda_graphs = True
    monkeypatch.setattr(loop_graphs, "gpu_bound_tokens", lambda config: 300)
    assert "512 tokens keep the GPU busy" in reasons_of(model, x)   # two rows at their bucket width, 256
    assert reasons_of(model, ids(1, 9)) == ""
    model.offload_checkpoints, model.offload_min_tokens = True, 0
    assert "offloads its checkpoints" in reasons_of(model, ids(1, 9))
    model.offload_min_tokens = 300   # the eager threshold: shorter forwards keep their inputs on the GPU
    assert "offloads" not in reasons_of(model, ids(1, 9))
    model.loop_graphs.turn = 1234
    assert "still waits for its backward" in reasons_of(model, ids(1, 9))
    model.loop_graphs.busy = True
    assert "inside a capture" in reasons_of(model, ids(1, 9))


def test_rows_replay_at_their_bucket_width():
    model = tiny(max_position_embeddings=4096)
    width = model.loop_graphs.width
    assert width(model, ids(1, 9)) == 256
    assert width(model, ids(2, 300)) == 512
    assert width(model, ids(1, 2049)) == 2304
    model.config.max_position_embeddings = 300
    assert width(model, ids(1, 290)) == 290   # the bucket would pass the positions
    assert "labels are not shaped like them" in reasons_of(model, ids(1, 9), labels=ids(1, 8))


def test_dropout_experts_and_images_keep_the_loop_eager():
    survey = Survey.of(tiny(dropout=0.1))
    assert survey.dropout is not None and "lora_dropout" in survey.dropout
    assert f"dropout is random ({survey.dropout})" in tiny().loop_graphs.reasons(tiny(), ids(), ids(), True, survey)
    moe = tiny(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    assert "mixture of experts" in reasons_of(moe, ids())


def test_the_stamp_changes_with_what_a_graph_depends_on():
    model = tiny()
    stamp = Survey.of(model).stamp
    assert Survey.of(model).stamp == stamp
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        lora_a.add_(1.0)   # an optimizer step writes in place: the graph reads the same memory
    assert Survey.of(model).stamp == stamp
    with disable_adapters(model):
        assert Survey.of(model).stamp != stamp
    assert Survey.of(model).stamp == stamp
    lora_a.requires_grad_(False)
    assert Survey.of(model).stamp != stamp
    lora_a.requires_grad_(True)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert Survey.of(model).stamp != stamp
    handle.remove()
    assert Survey.of(model).stamp == stamp
    norm = model.model.layers[1].input_layernorm
    norm.weight = torch.nn.Parameter(norm.weight.detach().clone(), requires_grad=False)   # new memory
    assert Survey.of(model).stamp != stamp


def test_gradient_buffers_follow_the_optimizer():
    model = tiny()
    graphs = LoopGraphs()
    trainable = Survey.of(model).trainable
    graphs.attach_grads(trainable)
    buffers = [p.grad for p in trainable]
    assert all(b is not None and not b.any() for b in buffers)
    for p in trainable:
        p.grad.add_(1.0)
    graphs.attach_grads(trainable)
    assert all(p.grad is b and bool((b == 1).all()) for p, b in zip(trainable, buffers))   # kept
    for p in trainable:   # zero_grad(set_to_none=True): the buffers come back zeroed
        p.grad = None
    graphs.attach_grads()
    assert all(p.grad is b and not b.any() for p, b in zip(trainable, buffers))
    trainable[0].grad = torch.full_like(trainable[0], 3.0)   # a gradient the caller put there is copied in
    graphs.attach_grads()
    assert trainable[0].grad is buffers[0] and bool((buffers[0] == 3).all())
    assert graphs.attach_grads(trainable) is False   # the same set: the same buffers
    trainable[0].requires_grad_(False)   # a new trainable set: new buffers (graphs wrote the old ones)
    fewer = Survey.of(model).trainable
    assert graphs.attach_grads(fewer) is True
    assert len(graphs.grads) == len(trainable) - 1 and all(p.grad is graphs.grads[id(p)][1] for p in fewer)
    assert fewer[0].grad is not buffers[1] and bool((fewer[0].grad == buffers[1]).all())   # values carried over


class StandIn:
    """A graph whose replay runs `work` (the real ones replay captured kernels)."""

    def __init__(self, work):
        self.work, self.replays = work, 0

    def replay(self) -> None:
        self.replays += 1
        self.work()


def replayed_pair(start: list[float]) -> tuple[torch.nn.Parameter, LoopGraphs, _Pair]:
    """A parameter holding `start`, graphs with its .grad buffer attached, and a pair whose 'forward
    graph' makes loss_sum = 2 * sum(param) and whose 'backward graph' adds upstream * 2 to
    param.grad, as the captured backward adds into the attached buffers."""
    param = torch.nn.Parameter(torch.tensor(start))
    graphs = LoopGraphs()
    graphs.attach_grads([param])
    pair = _Pair((), torch.zeros(1), torch.zeros(1), None, None, loss_sum=torch.zeros(()),
                 num_targets=torch.tensor(5), upstream=torch.zeros(()))
    pair.forward = StandIn(lambda: pair.loss_sum.copy_(2 * param.detach().sum()))
    pair.backward = StandIn(lambda: param.grad.add_(2 * pair.upstream))
    return param, graphs, pair


def replay(graphs: LoopGraphs, pair: _Pair) -> tuple[torch.Tensor, torch.Tensor]:
    turn = _Turn(pair, graphs)
    graphs.turn = id(turn)
    return _Replay.apply(turn, graphs, torch.empty(0, requires_grad=True))


def test_a_replay_backward_adds_the_incoming_gradient_and_hands_the_turn_back():
    param, graphs, pair = replayed_pair([1.0, 2.0])
    loss_sum, count = replay(graphs, pair)
    assert float(loss_sum.detach()) == 6.0 and int(count) == 5 and not count.requires_grad
    assert graphs.turn is not None
    (loss_sum / count).backward()
    assert torch.allclose(param.grad, torch.full((2,), 2 / 5)) and graphs.turn is None
    loss_sum, count = replay(graphs, pair)   # accumulates, as eager backward passes do
    (3 * loss_sum).backward()
    assert torch.allclose(param.grad, torch.full((2,), 2 / 5 + 6)) and pair.backward.replays == 2


def test_a_loss_dropped_without_backward_frees_the_turn():
    _, graphs, pair = replayed_pair([1.0, 1.0])
    loss_sum, _ = replay(graphs, pair)
    assert graphs.turn is not None
    del loss_sum, _
    gc.collect()
    assert graphs.turn is None and pair.backward.replays == 0


def test_a_second_backward_after_another_forward_is_refused():
    _, graphs, pair = replayed_pair([1.0, 1.0])
    first, _ = replay(graphs, pair)
    first.backward(retain_graph=True)
    second, _ = replay(graphs, pair)   # its forward wrote over what the first's backward would read
    with pytest.raises(RuntimeError, match="replayed again before its backward"):
        first.backward()
    second.backward()


def test_a_copied_or_pickled_model_captures_its_own_graphs():
    import copy
    import pickle

    model = tiny()
    model.loop_graphs.seen.add(("shape",))
    model.loop_graphs.max_shapes = 2
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.loop_graphs.seen == set() and copied.loop_graphs.max_shapes == 2


def test_the_trainer_turns_the_models_own_graphs_off(tmp_path):
    from tests.train.train_helpers import make_examples
    from velotune.train.config import TrainConfig
    from velotune.train.trainer import Trainer

    model = tiny()
    assert model.cuda_graphs is True
    Trainer(model, TrainConfig(output_dir=str(tmp_path), max_steps=1), make_examples(4), show_progress=False)
    assert model.cuda_graphs is False


def test_a_padding_mask_goes_to_the_graphs_and_one_of_ones_counts_as_none(monkeypatch):
    """What a tokenizer gives (`model(**batch)`): an unpadded batch's mask is dropped, a padded
    one is handed over for its own graphs; either replays where nothing else stands in the way."""
    model, x = tiny(), ids()
    asked = []
    monkeypatch.setattr(model.loop_graphs, "run",
                        lambda m, i, labels, plain, mask: asked.append((plain, mask)))
    ones = torch.ones_like(x)
    padded = ones.clone()
    padded[0, -3:] = 0
    full = model(x, attention_mask=ones, labels=x)
    model(x, attention_mask=padded, labels=x)
    assert asked[0] == (True, None) and asked[1][0] is True and torch.equal(asked[1][1], padded)
    assert torch.equal(full.loss, model(x, labels=x).loss)
    graphs = LoopGraphs()
    assert "not shaped like the ids" in " ".join(graphs.reasons(model, x, x, True, attention_mask=padded[:, :4]))


def test_a_capture_keeps_a_mask_of_ones(monkeypatch):
    """Inside a capture the all-ones test cannot run (it waits for the GPU): the mask is applied."""
    from velotune.models import masks

    ones = torch.ones(2, 5, dtype=torch.long)
    assert masks.attention_mask_for(5, 0, ones, None, None, torch.device("cpu")) is None
    monkeypatch.setattr(masks, "capturing", lambda tensor: True)
    kept = masks.attention_mask_for(5, 0, ones, None, None, torch.device("cpu"))
    assert kept is not None and torch.equal(kept[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
