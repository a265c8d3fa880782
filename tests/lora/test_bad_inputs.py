"""Every bad adapter folder or LoRA setting fails with a clear error naming the file and key."""
from __future__ import annotations

import json

import pytest
import torch
from tests.lora.lora_helpers import load_ours, make_reference
from safetensors.torch import load_file, save_file

import velotune
from velotune.errors import LoadError
from velotune.loaders.adapter import load_adapter, load_adapter_weights
from velotune.lora import LoraConfig, LoraConfigError, apply_lora, save_adapter


@pytest.fixture
def adapter(tmp_path):
    """A base folder and a valid adapter folder for it (q_proj, v_proj; r=4)."""
    make_reference("qwen2", tmp_path / "base")
    model = load_ours(tmp_path / "base")
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init=False))
    save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    return tmp_path / "adapter"


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def edit_weights(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_valid_adapter_loads(adapter):
    model, _ = velotune.load_model(adapter, dtype=torch.float32, device="cpu")
    assert model.lora_config.r == 4


def test_missing_config(adapter):
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(LoadError, match=r"adapter_config.json: no such file"):
        load_adapter(adapter)


def test_missing_weights(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"adapter_model.safetensors: no such file"):
        velotune.load_model(adapter, dtype=torch.float32, device="cpu")


def test_config_not_json(adapter):
    (adapter / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(LoadError, match=r"adapter_config.json, line 3: not valid JSON"):
        load_adapter(adapter)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("peft_type", "IA3", "peft_type 'IA3' is not supported"),
    ("task_type", "SEQ_CLS", "task_type 'SEQ_CLS' is not supported"),
    ("fan_in_fan_out", True, "fan_in_fan_out = True is not supported"),
    ("rank_pattern", {"q_proj": 8}, "rank_pattern = .* is not supported"),
    ("modules_to_save", "lm_head", "modules_to_save must be a list of module names"),
    ("init_lora_weights", "pissa", "init_lora_weights 'pissa' is not supported"),
    ("target_modules", ".*q_proj", "target_modules '.\\*q_proj' is a regular expression"),
    ("target_modules", ["q_proj", "conv1d"], r"LoraConfig.target_modules: unknown module\(s\) \['conv1d'\]"),
    ("r", 0, "LoraConfig.r: must be a positive integer"),
    ("target_modules", None, "target_modules is missing or empty"),
])
def test_unsupported_config(adapter, key, value, message):
    edit_config(adapter, **{key: value})
    with pytest.raises(LoadError, match=f"adapter_config.json: {message}"):
        load_adapter(adapter)


def test_modules_to_save_without_their_tensors(adapter):
    edit_config(adapter, modules_to_save=["lm_head"])
    with pytest.raises(LoadError, match=r"adapter_model.safetensors: missing adapter tensors base_model.model.lm_head.weight"):
        load_adapter(adapter)


def test_key_matching_no_module(adapter):
    def rename(tensors):
        tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = \
            tensors.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight")
    edit_weights(adapter, rename)
    with pytest.raises(LoadError, match=r"adapter_model.safetensors: tensor "
                                        r"'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight' "
                                        r"matches no LoRA module"):
        load_adapter(adapter)


def test_rank_mismatch(adapter):
    edit_config(adapter, r=8)
    with pytest.raises(LoadError, match=r"adapter_model.safetensors: tensor "
                                        r"'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape "
                                        r"\(4, 32\), expected \(8, 32\) \(r=8 in adapter_config.json\)"):
        load_adapter(adapter)


def test_missing_tensor(adapter):
    edit_weights(adapter, lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"))
    with pytest.raises(LoadError, match=r"missing adapter tensors "
                                        r"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"):
        load_adapter(adapter)


def test_dora_config_for_a_lora_file(adapter):
    edit_config(adapter, use_dora=True)
    with pytest.raises(LoadError, match=r"missing adapter tensors .*q_proj.lora_magnitude_vector"):
        load_adapter(adapter)


def test_key_without_peft_prefix(adapter, tmp_path):
    model = load_ours(tmp_path / "base")
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    path = tmp_path / "plain.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, path)
    with pytest.raises(LoadError, match=r"plain.safetensors: tensor 'model.layers.0.self_attn.q_proj.lora_A.weight' "
                                        r"does not start with 'base_model.model.'"):
        load_adapter_weights(model, path)


def test_base_missing(adapter, tmp_path):
    edit_config(adapter, base_model_name_or_path=str(tmp_path / "nowhere"))
    with pytest.raises(LoadError, match="nowhere: no such file or folder"):
        load_adapter(adapter)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(r=0), "LoraConfig.r: must be a positive integer"),
    (dict(alpha=-1.0), "LoraConfig.alpha: must be a positive number"),
    (dict(dropout=1.0), r"LoraConfig.dropout: must be in \[0, 1\)"),
    (dict(bias="all"), "LoraConfig.bias: only 'none'"),
    (dict(init="pissa"), "LoraConfig.init: must be one of"),
    (dict(target_modules=[]), "LoraConfig.target_modules: empty"),
    (dict(target_modules="every-linear"), "LoraConfig.target_modules: a single string must be 'all-linear'"),
    (dict(target_modules=["q_proj", "qkv_proj"]), r"unknown module\(s\) \['qkv_proj'\]"),
])
def test_bad_lora_config(kwargs, message):
    with pytest.raises(LoraConfigError, match=message):
        LoraConfig(**kwargs)


def test_target_absent_from_model_and_double_apply(tmp_path):
    make_reference("qwen2", tmp_path)
    model = load_ours(tmp_path)
    with pytest.raises(LoraConfigError, match=r"\['model.layers.7.mlp.up_proj'\] match no module"):
        apply_lora(model, LoraConfig(target_modules=["q_proj", "model.layers.7.mlp.up_proj"]))
    model = load_ours(tmp_path)
    apply_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(LoraConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig(target_modules=["v_proj"]))


def test_save_without_adapters(tmp_path):
    make_reference("qwen2", tmp_path / "base")
    with pytest.raises(LoraConfigError, match="no LoRA adapters"):
        save_adapter(load_ours(tmp_path / "base"), tmp_path / "out", None)
