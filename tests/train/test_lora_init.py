"""`lora_init: quant_error` through `train_from_config`: the key's checks, the training rows the
fit is measured on, a better start than the zero-started 4-bit base, and an adapter that reloads
(and exports) on the 4-bit base it belongs to."""
from __future__ import annotations

import json

import pytest
import torch

import velotune
from tests.train.test_methods import quiet, run_config
from velotune import LoadError
from velotune.lora.peft_format import BASE_FILE
from velotune.quant import Linear4bit
from velotune.train.config import TrainConfigError, check_values, load_config
from velotune.train.methods import calibration_rows
from velotune.train.run import train_from_config

transformers = pytest.importorskip("transformers")


def test_lora_init_key_is_checked(tmp_path):
    with pytest.raises(TrainConfigError, match="key 'lora_init' must be one of zero, quant_error"):
        check_values(load_config(None, ["--lora_init=loftq"]), "cli")
    with pytest.raises(TrainConfigError, match="key 'lora_init' does not apply to method lora"):
        check_values(load_config(None, ["--method=lora", "--lora_init=quant_error"]), "cli")
    with pytest.raises(TrainConfigError, match="key 'lora_init' needs a 4-bit base .* load_in_4bit: true with method dpo"):
        check_values(load_config(None, ["--method=dpo", "--lora_init=quant_error"]), "cli")
    check_values(load_config(None, ["--method=dpo", "--load_in_4bit=true", "--lora_init=quant_error"]), "cli")
    check_values(load_config(None, ["--method=qlora", "--lora_init=quant_error"]), "cli")
    check_values(load_config(None, ["--method=lora", "--lora_init=zero"]), "cli")


def test_calibration_takes_rows_spread_over_the_set_packed_into_a_batch():
    rows = [[i] * 10 for i in range(100)]             # row i holds ten copies of i
    ids, positions = calibration_rows(rows, tokens=40, row_tokens=20)
    # ceil(1.25 * 40 / 10) = 5 rows chosen, every 20th; the first four fill the budget, two to a packed row
    assert ids.tolist() == [[0] * 10 + [20] * 10, [40] * 10 + [60] * 10]
    assert positions.tolist() == [list(range(10)) * 2] * 2
    # A training row crossing into the next packed row goes on there.
    ids, positions = calibration_rows(rows, tokens=30, row_tokens=15)
    assert ids.tolist() == [[0] * 10 + [25] * 5, [25] * 5 + [50] * 10]
    assert positions.tolist() == [list(range(10)) + list(range(5)), list(range(5, 10)) + list(range(10))]
    # Fewer tokens than the budget: every row once, in one packed row.
    ids, positions = calibration_rows([[1, 2], [], [3]], tokens=100, row_tokens=64)
    assert ids.tolist() == [[1, 2, 3]] and positions.tolist() == [[0, 1, 0]]
    with pytest.raises(ValueError, match="no training rows"):
        calibration_rows([[], []])


def logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode("Hello there, who are you?")])
    with torch.no_grad():
        return model.eval()(ids).logits


def test_quant_error_init_starts_closer_and_its_adapter_stays_on_the_4bit_base(tmp_path):
    settings = dict(method="qlora", learning_rate=2e-2, lora_r=8, lora_alpha=16, max_steps=2)
    plain = train_from_config(run_config(tmp_path / "plain", **settings), console=quiet(), show_progress=False)
    config = run_config(tmp_path / "init", lora_init="quant_error", export=["hf:f32"], **settings)
    result = train_from_config(config, console=quiet(), show_progress=False)
    assert result.eval_loss_before < plain.eval_loss_before

    assert json.loads((result.output / BASE_FILE).read_text()) == {
        "load_in_4bit": True, "quant_type": "nf4", "keep_16bit": ["embed_tokens", "lm_head"], "keep_16bit_dynamic": 0}
    assert not (plain.output / BASE_FILE).exists()
    # A plain load of the adapter gets the 4-bit base it was trained on ...
    reloaded, tokenizer = velotune.load_model(result.output, dtype=torch.float32, device="cpu")
    assert isinstance(reloaded.model.layers[0].mlp.down_proj.base_layer, Linear4bit)
    assert reloaded.adapter_base["load_in_4bit"] is True
    # ... and computes what the run's merged export (merged into the dequantized base) computes.
    [hf_dir] = result.exports
    merged = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    ids = torch.tensor([tokenizer.encode("Hello there, who are you?")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, logits(reloaded, tokenizer), rtol=1e-4, atol=1e-4)
    # An export from the folder goes through the same 4-bit base.
    from velotune.export import export

    again = export(tmp_path / "init" / "run", to="hf", quant="f32", out=tmp_path / "again")
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(again).float().eval()(ids).logits
    torch.testing.assert_close(theirs, merged(ids).logits, rtol=1e-4, atol=1e-4)
    # On the 16-bit base the adapter would add the rounding error a second time: asking for a
    # different 4-bit base is refused with the key named.
    with pytest.raises(LoadError, match="keep_16bit_dynamic = 0.*keep_16bit_dynamic = 1"):
        velotune.load_model(result.output, dtype=torch.float32, device="cpu", load_in_4bit=True,
                            keep_16bit_dynamic=1)


@pytest.mark.gpu
def test_quant_error_init_on_the_gpu(tmp_path):
    """bf16 base, 4-bit dequantized by the Triton kernel, adapters set on the GPU."""
    settings = dict(method="qlora", learning_rate=2e-2, lora_r=8, lora_alpha=16, max_steps=4, device="cuda")
    plain = train_from_config(run_config(tmp_path / "plain", **settings), console=quiet(), show_progress=False)
    result = train_from_config(run_config(tmp_path / "init", lora_init="quant_error", **settings),
                               console=quiet(), show_progress=False)
    assert result.eval_loss_before < plain.eval_loss_before
    assert result.eval_loss_after < 0.95 * result.eval_loss_before
