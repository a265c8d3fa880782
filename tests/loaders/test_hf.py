"""Hugging Face folder loading: sharded weights, and one clear error per kind of bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import velotune
from velotune import ConfigError, LoadError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture()
def folder(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_sharded_folder_loads_like_single_file(folder, tmp_path_factory):
    path, ref = folder
    sharded = tmp_path_factory.mktemp("sharded")
    ref.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a, _ = velotune.load_model(path, dtype=torch.float32, device="cpu")
    b, _ = velotune.load_model(sharded, dtype=torch.float32, device="cpu")
    ids = torch.arange(3, 20)[None]
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(LoadError, match="no-such-model"):
        velotune.load_model(tmp_path / "no-such-model")


def test_missing_config_names_file(folder):
    path, _ = folder
    (path / "config.json").unlink()
    with pytest.raises(LoadError, match=r"config\.json: file not found"):
        velotune.load_model(path)


def test_missing_weights_names_folder(folder):
    path, _ = folder
    (path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no model.safetensors"):
        velotune.load_model(path)


def test_truncated_safetensors_names_file(folder):
    path, _ = folder
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"model\.safetensors: unreadable safetensors"):
        velotune.load_model(path)


def test_unknown_architecture_names_key(folder):
    path, _ = folder
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mamba", ["MambaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unknown architecture.*mamba"):
        velotune.load_model(path)


def test_wrong_shape_names_tensor(folder):
    path, _ = folder
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(LoadError, match=rf"{name}' has shape \(47, 32\), expected \(48, 32\)"):
        velotune.load_model(path)


def test_missing_tensor_is_named(folder):
    path, _ = folder
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.v_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(LoadError, match=r"missing tensors model\.layers\.0\.self_attn\.v_proj\.weight"):
        velotune.load_model(path)


def test_missing_config_key_is_named(folder):
    path, _ = folder
    cfg = json.loads((path / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing key 'num_hidden_layers'"):
        velotune.load_model(path)


def test_unsupported_rope_scaling_is_named(folder):
    path, _ = folder
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rope scaling type 'longrope'"):
        velotune.load_model(path)


def test_hub_id_offline_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="Hub download failed"):
        velotune.load_model("someone/some-model-that-is-not-local")
