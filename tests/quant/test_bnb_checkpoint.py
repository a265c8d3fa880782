"""`*-bnb-4bit` folders: written by transformers + bitsandbytes on the CPU, loaded by us without
dequantizing; ours written the same way and read back by transformers + bitsandbytes; every
layout we do not read fails naming the tensor or config field."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import velotune
from tests.quant.bnb_saver import save_4bit_hf
from velotune import LoadError
from velotune.quant import Linear4bit

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bnb_folder(tmp_path, quant_type="nf4", double=True, name="bnb"):
    """A tiny random Llama quantized and saved by transformers + bitsandbytes (CPU backend)."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path / "fp32")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=double,
                                                 bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=bnb_config,
                                                              dtype=torch.float32, device_map="cpu")
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model.eval()


@pytest.mark.parametrize("quant_type,double", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_transformers_bnb_folder_loads_without_dequantizing(tmp_path, quant_type, double):
    folder, theirs = bnb_folder(tmp_path, quant_type, double)
    ours, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    stored = load_file(folder / "model.safetensors")
    for i in range(2):
        for proj in PROJECTIONS:
            part = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
            name = f"model.layers.{i}.{part}.{proj}"
            layer = ours.get_submodule(name)
            assert isinstance(layer, Linear4bit) and layer.quant_type == quant_type
            assert torch.equal(layer.packed, stored[f"{name}.weight"])                 # the codes as stored
            assert torch.equal(layer.quant_state.absmax, stored[f"{name}.weight.absmax"])
            bnb_layer = theirs.get_submodule(name)
            assert torch.equal(layer.dequantized_weight(),
                               bnb.functional.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state))
    assert ours.quant_report.prequantized and len(ours.quant_report.quantized) == 14
    # bitsandbytes' CPU 4-bit matmul runs at reduced precision (about 1e-3 off x @ W.T per layer),
    # so the logits agree closely but not exactly; the weights above are bit-identical.
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        ref = theirs(ids).logits
        assert (ours.eval()(ids).logits - ref).norm() / ref.norm() < 1e-2


def test_our_4bit_save_is_read_by_transformers_and_bitsandbytes(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path / "fp32")
    ours, _ = velotune.load_model(tmp_path / "fp32", dtype=torch.float32, device="cpu", load_in_4bit=True,
                                  keep_16bit=["lm_head", "model.layers.1.mlp.down_proj"])
    save_4bit_hf(ours, tmp_path / "saved")
    qc = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32,
                                                               device_map="cpu").eval()
    q = theirs.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert torch.equal(q.weight.data, ours.model.layers[0].self_attn.q_proj.packed)
    assert not isinstance(theirs.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    dequantized = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert torch.equal(dequantized, ours.model.layers[0].self_attn.q_proj.dequantized_weight())
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        ref = theirs(ids).logits
        assert (ours.eval()(ids).logits - ref).norm() / ref.norm() < 1e-2
    again, _ = velotune.load_model(tmp_path / "saved", dtype=torch.float32, device="cpu")   # and we read it back
    with torch.no_grad():
        assert torch.equal(again.eval()(ids).logits, ours(ids).logits)


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"].update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def set_json(tensors, key, **fields):
    meta = json.loads(bytes(tensors[key].tolist()))
    meta.update(fields)
    tensors[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


STATE = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize("breakage,message", [
    (lambda f: edit_config(f, load_in_8bit=True, _load_in_8bit=True),
     r"config\.json: quantization_config\.load_in_8bit"),
    (lambda f: edit_config(f, bnb_4bit_quant_storage="bfloat16"), r"bnb_4bit_quant_storage 'bfloat16'"),
    (lambda f: edit_config(f, quant_method="gptq"), r"quant_method 'gptq'"),
    (lambda f: edit_tensors(f, lambda t: t.pop("model.layers.0.mlp.up_proj.weight.nested_absmax")),
     r"model\.layers\.0\.mlp\.up_proj\.weight\.nested_absmax: missing"),
    (lambda f: edit_tensors(f, lambda t: set_json(t, STATE, blocksize=100)),
     r"up_proj\.weight\.quant_state\.bitsandbytes__nf4: blocksize 100"),
    (lambda f: edit_tensors(f, lambda t: t.update({"model.layers.0.mlp.up_proj.weight":
                                                   t["model.layers.0.mlp.up_proj.weight"].view(torch.int8)})),
     r"model\.layers\.0\.mlp\.up_proj\.weight: packed 4-bit codes stored as torch\.int8"),
    (lambda f: edit_tensors(f, lambda t: t.pop(STATE)),
     r"model\.layers\.0\.mlp\.up_proj\.weight: expected one tensor .*quant_state"),
    (lambda f: edit_tensors(f, lambda t: t.update({
        STATE.replace("nf4", "int8"): t.pop(STATE)})), r"unsupported quantization state"),
])
def test_unsupported_layouts_fail_naming_the_tensor_or_field(tmp_path, breakage, message):
    folder, _ = bnb_folder(tmp_path)
    breakage(folder)
    with pytest.raises(LoadError, match=message):
        velotune.load_model(folder, dtype=torch.float32, device="cpu")
