"""`offload_embeddings: true | false | auto` in the trainer: parsing errors name the key, the
trainer moves a frozen untied table to host memory (same losses and adapter gradients) and
refuses a tied one with the reason; auto leaves what it cannot or need not move."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.train.train_helpers import load_tiny, make_examples
from velotune.data import collate_padded
from velotune.models.host_embedding import HostEmbedding
from velotune.rl.preference import PreferenceExample
from velotune.train import methods
from velotune.train.config import TrainConfig, TrainConfigError, load_config
from velotune.train.trainer import Trainer


def test_default_is_auto_and_bad_values_name_the_key(tmp_path):
    assert load_config(None, []).offload_embeddings == "auto"
    assert load_config(None, ["--offload-embeddings=false"]).offload_embeddings is False
    with pytest.raises(TrainConfigError, match=r"command line --offload_embeddings: key 'offload_embeddings' "
                                               r"must be true, false or auto, got 'sometimes'"):
        load_config(None, ["--offload_embeddings=sometimes"])
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 3\noffload_embeddings: 2\n")
    with pytest.raises(TrainConfigError, match=r"run.yaml line 2: key 'offload_embeddings' must be true or false "
                                               r"or a string, got 2"):
        load_config(path)


@pytest.mark.parametrize("overrides, reason", [
    (["--method=full"], "does not apply to method full"),
    (["--target_modules=[q_proj, model.embed_tokens]"], "LoRA adapter on embed_tokens"),
])
def test_true_where_it_cannot_apply_is_refused_at_parse_time(overrides, reason):
    with pytest.raises(TrainConfigError, match=rf"key 'offload_embeddings' .*{reason}"):
        load_config(None, ["--offload_embeddings=true", *overrides])
    load_config(None, ["--offload_embeddings=auto", *overrides])   # auto decides later, quietly


def lora_trainer(folder, tmp_path, examples, offload, method="lora") -> Trainer:
    config = TrainConfig(method=method, lora_r=4, output_dir=str(tmp_path / f"run-{offload}"), micro_batch_size=2,
                         offload_embeddings=offload, device="cpu")
    torch.manual_seed(0)
    model = methods.prepare(load_tiny(folder), config)
    return Trainer(model, config, examples, show_progress=False)


def step(trainer: Trainer, batches) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.accumulate(batches)
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_trainer_step_equal_with_the_table_on_the_host(tiny_model_dir, tmp_path):
    examples = make_examples(6, seed=3)
    batches = [collate_padded(examples[i:i + 2], 0) for i in range(0, 6, 2)]
    folder = tiny_model_dir("qwen2")                       # untied head
    on_device = lora_trainer(folder, tmp_path, examples, False)
    on_host = lora_trainer(folder, tmp_path, examples, True)
    assert isinstance(on_device.model.model.embed_tokens, nn.Embedding)
    assert isinstance(on_host.model.model.embed_tokens, HostEmbedding)
    assert on_host.device.type == "cpu"                    # the first parameter is no longer the table
    expected, got = step(on_device, batches), step(on_host, batches)
    assert got[0] == expected[0]
    assert got[1].keys() == expected[1].keys() and all("lora_" in n for n in got[1])
    for name, grad in expected[1].items():
        assert torch.equal(got[1][name], grad), name
    assert not any(p is on_host.model.model.embed_tokens.weight for p in on_host.params)


def test_dpo_step_equal_with_the_table_on_the_host(tiny_model_dir, tmp_path):
    """The policy and the adapter-free reference both read the host table (Trainer.forward)."""
    pairs = [PreferenceExample(e.input_ids[:4], e.input_ids[4:], e.input_ids[4:][::-1], e.where)
             for e in make_examples(4, seed=6, min_len=7)]
    folder = tiny_model_dir("qwen2")
    on_device = lora_trainer(folder, tmp_path, pairs, False, "dpo")
    on_host = lora_trainer(folder, tmp_path, pairs, True, "dpo")
    assert isinstance(on_host.model.model.embed_tokens, HostEmbedding)
    batches = on_device.objective.micro_batches(on_device, [pairs[:2], pairs[2:]], 0)
    expected, got = step(on_device, batches), step(on_host, batches)
    assert got[0] == expected[0] and got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        assert torch.equal(got[1][name], grad), name


def test_tied_model_is_refused_with_the_reason_and_auto_leaves_it(tiny_model_dir, tmp_path):
    examples = make_examples(4, seed=4)
    folder = tiny_model_dir("llama")                       # tied head
    with pytest.raises(TrainConfigError, match=r"key 'offload_embeddings': .*tie_word_embeddings"):
        lora_trainer(folder, tmp_path, examples, True)
    trainer = lora_trainer(folder, tmp_path, examples, "auto")
    assert isinstance(trainer.model.model.embed_tokens, nn.Embedding)


def test_auto_on_the_cpu_leaves_the_table(tiny_model_dir, tmp_path):
    trainer = lora_trainer(tiny_model_dir("qwen2"), tmp_path, make_examples(4, seed=5), "auto")
    assert isinstance(trainer.model.model.embed_tokens, nn.Embedding)
