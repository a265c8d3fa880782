"""`trainable_modules` (trained in full beside LoRA, at their own learning rate) and `new_tokens`
(tokenizer and embedding rows, mean-initialised), saved in PEFT's modules_to_save layout: peft
loads the adapter folder onto the transformers base and gives our logits, for an untied model with
new tokens and for a tied one."""
from __future__ import annotations

import json

import pytest
import torch

import velotune
from tests.cli.cli_helpers import byte_tokenizer, make_chat_model
from tests.distributed.gloo_helpers import quiet, write_chat_data
from tests.train.train_helpers import load_tiny, make_examples, save_tiny
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.models.vocab import add_token_rows
from velotune.train import methods
from velotune.train.config import TrainConfig, TrainConfigError
from velotune.train.run import train_from_config
from velotune.train.trainer import Trainer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
NEW = ["<tool>", "</tool>"]


def untied_chat_model(folder):
    tokenizer = byte_tokenizer()
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def test_new_rows_start_at_the_mean_and_a_tied_head_follows():
    torch.manual_seed(0)
    for tied in (True, False):
        cfg = ModelConfig(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=4, tie_word_embeddings=tied)
        model = Transformer(cfg)
        embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
        add_token_rows(model, [9, 12])              # 9 lies inside the old matrix, 12 beyond it
        new_embed = model.model.embed_tokens.weight
        assert new_embed.shape == (13, 8) and model.config.vocab_size == 13 and model.lm_head.out_features == 13
        kept = [i for i in range(11) if i != 9]
        assert torch.equal(new_embed[kept], embed[kept])
        for row in (9, 11, 12):
            assert torch.allclose(new_embed[row], embed[kept].mean(0))
            assert torch.allclose(model.lm_head.weight[row], (embed if tied else head)[kept].mean(0))
        assert (model.lm_head.weight is new_embed) == tied
        assert model(torch.tensor([[12, 3]])).logits.shape == (1, 2, 13)


def run(tmp_path, model_folder, name, **values):
    data = write_chat_data(tmp_path / "chat.jsonl", 24)
    text = data.read_text().replace('"content": "alpha', '"content": "<tool>alpha</tool>')
    data.write_text(text)
    config = TrainConfig(model=str(model_folder), dataset=str(data), dataset_format="messages", method="lora",
                         output_dir=str(tmp_path / name), max_steps=4, micro_batch_size=4, learning_rate=1e-3,
                         lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], eval_split=0.0, report=False,
                         device="cpu", **values)
    return train_from_config(config, console=quiet(), show_progress=False)


def peft_logits(base_folder, adapter, ids, vocab: int) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, torch_dtype=torch.float32)
    if vocab != base.config.vocab_size:
        base.resize_token_embeddings(vocab, mean_resizing=False)     # PEFT's recipe: grow, then load
    return peft.PeftModel.from_pretrained(base, adapter).eval()(ids).logits


def test_new_tokens_and_full_modules_load_in_peft(tmp_path):
    base = untied_chat_model(tmp_path / "base")
    before, _ = velotune.load_model(base, dtype=torch.float32, device="cpu")
    result = run(tmp_path, base, "run", trainable_modules=["embed_tokens", "lm_head"], trainable_modules_lr=5e-2,
                 new_tokens=NEW)
    adapter = result.output
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["modules_to_save"] == ["embed_tokens", "lm_head"] and not settings["ensure_weight_tying"]
    ours, tokenizer = velotune.load_model(adapter, dtype=torch.float32, device="cpu")
    new_ids = tokenizer.convert_tokens_to_ids(NEW)
    assert new_ids == [len(byte_tokenizer()), len(byte_tokenizer()) + 1]
    x = tokenizer.encode("x", add_special_tokens=False)
    assert tokenizer.encode("<tool>x</tool>", add_special_tokens=False) == [new_ids[0], *x, new_ids[1]]
    assert ours.config.vocab_size == before.config.vocab_size + 2
    # full modules trained at their own rate, the base projections untouched
    trained = ours.model.embed_tokens.weight
    assert not torch.equal(trained[:-2], before.model.embed_tokens.weight)
    assert torch.equal(ours.model.layers[0].self_attn.q_proj.base_layer.weight, before.model.layers[0].self_attn.q_proj.weight)
    ids = torch.tensor([[new_ids[0], 70, 71, new_ids[1], 2, 80]])
    with torch.no_grad():
        want = peft_logits(base, adapter, ids, ours.config.vocab_size)
        got = ours.eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_tied_embedding_trained_in_full_loads_in_peft(tmp_path):
    base = make_chat_model(tmp_path / "base")
    adapter = run(tmp_path, base, "run", trainable_modules=["embed_tokens"]).output
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["modules_to_save"] == ["embed_tokens", "lm_head"] and settings["ensure_weight_tying"]
    ours, _ = velotune.load_model(adapter, dtype=torch.float32, device="cpu")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.tensor([[5, 70, 71, 2, 80, 90]])
    with torch.no_grad():
        want = peft_logits(base, adapter, ids, ours.config.vocab_size)
        got = ours.eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_own_learning_rate_and_what_is_trained(tmp_path):
    save_tiny("qwen2", tmp_path / "tiny")
    config = TrainConfig(method="lora", output_dir=str(tmp_path / "run"), lora_r=4, micro_batch_size=2,
                         learning_rate=1e-3, trainable_modules=["lm_head"], trainable_modules_lr=3e-2, max_steps=1)
    model = methods.prepare(load_tiny(tmp_path / "tiny"), config)
    trainer = Trainer(model, config, make_examples(4), show_progress=False)
    rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert rates[id(model.lm_head.weight)] == 3e-2 and model.lm_head.weight.dtype == torch.float32
    assert {rates[id(p)] for n, p in model.named_parameters() if "lora_" in n} == {1e-3}
    assert not model.model.embed_tokens.weight.requires_grad
    with pytest.raises(TrainConfigError, match="key 'trainable_modules': the model has no module called 'lm_haed'"):
        methods.prepare(load_tiny(tmp_path / "tiny"), TrainConfig(method="lora", trainable_modules=["lm_haed"]))
