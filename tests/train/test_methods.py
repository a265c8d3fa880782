"""Full fine-tuning and QLoRA through `train_from_config` on a tiny chat model: what each
method trains, and that its output folder loads back (the full model also in transformers)."""
from __future__ import annotations

import pytest
import torch
from rich.console import Console

import velotune
from tests.cli.cli_helpers import make_chat_model
from velotune.quant import Linear4bit
from velotune.train.config import METHODS, TrainConfig
from velotune.train.methods import REGISTRY
from velotune.train.run import train_from_config

transformers = pytest.importorskip("transformers")


def run_config(tmp_path, **values) -> TrainConfig:
    settings = dict(model=str(make_chat_model(tmp_path / "model")), dataset="chatterbot:ai,greetings",
                    eval_split=0.2, output_dir=str(tmp_path / "run"), max_steps=6, micro_batch_size=8,
                    max_seq_length=160, warmup_steps=1, seed=0)
    return TrainConfig(**{**settings, **values})


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"))


def test_full_fine_tune_writes_a_hugging_face_folder(tmp_path):
    config = run_config(tmp_path, method="full", learning_rate=3e-3)
    result = train_from_config(config, console=quiet(), show_progress=False)
    assert result.eval_loss_after < 0.8 * result.eval_loss_before
    folder = tmp_path / "run" / "model"
    assert result.output == folder
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()}
    ours, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    ids = torch.tensor([tokenizer.encode("Hello there, who are you?")])
    with torch.no_grad():
        assert torch.allclose(ours.eval()(ids).logits, theirs(ids).logits, atol=1e-5)
    base, _ = velotune.load_model(tmp_path / "model", dtype=torch.float32, device="cpu")
    changed = [n for (n, a), (_, b) in zip(ours.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) == len(list(base.parameters()))     # every weight was trained


def test_qlora_trains_adapters_over_a_4bit_base(tmp_path):
    config = run_config(tmp_path, method="qlora", learning_rate=2e-2, lora_r=8, lora_alpha=16)
    result = train_from_config(config, console=quiet(), show_progress=False)
    assert result.eval_loss_after < 0.95 * result.eval_loss_before
    model, _ = velotune.load_model(result.output, dtype=torch.float32, device="cpu")
    assert model.lora_config.r == 8
    from velotune.quant import quantize_linears

    base, _ = velotune.load_model(tmp_path / "model", dtype=torch.float32, device="cpu")
    assert len(quantize_linears(base)) == 2 * 7
    assert isinstance(base.model.layers[0].mlp.down_proj, Linear4bit)


def test_run_ends_with_the_exports_it_was_asked_for(tmp_path):
    # (the tiny test tokenizer has no llama.cpp pre-tokenizer name, so GGUF is covered in tests/export)
    config = run_config(tmp_path, method="lora", learning_rate=2e-2, max_steps=2, export=["hf:f32"])
    result = train_from_config(config, console=quiet(), show_progress=False)
    [hf_dir] = result.exports
    assert hf_dir == tmp_path / "run" / "export-hf-f32"
    trained, tokenizer = velotune.load_model(result.output, dtype=torch.float32, device="cpu")
    merged = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    ids = torch.tensor([tokenizer.encode("Hello there, who are you?")])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trained.eval()(ids).logits, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_each_method_trains_on_the_gpu_with_bf16_autocast(tmp_path, method):
    """The fast path under autocast: bf16 block outputs meet a float32 residual stream."""
    config = run_config(tmp_path, method=method, learning_rate=3e-3 if method == "full" else 2e-2, device="cuda")
    result = train_from_config(config, console=quiet(), show_progress=False)
    assert result.eval_loss_after < 0.9 * result.eval_loss_before


def test_the_registry_holds_every_method_of_the_config():
    assert sorted(REGISTRY) == sorted(METHODS)
    assert {m.objective for m in REGISTRY.values()} == {"sft", "pairs", "kto", "grpo"}
