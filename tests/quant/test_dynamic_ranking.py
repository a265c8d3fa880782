"""keep_16bit_dynamic ranks linears by activation-weighted 4-bit error on calibration text, keeps the
worst in 16-bit, reports them, and refuses counts that cannot be right."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import velotune
from tests.cli.cli_helpers import make_chat_model
from velotune import LoadError
from velotune.models.calibration import calibration_ids
from velotune.quant import Linear4bit, quantize_nf4
from velotune.quant.policy import relative_error, weighted_relative_error

pytest.importorskip("transformers")

HARD = ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 2-layer chat model (byte tokenizer, so calibration runs) where two projections carry an
    outlier input column (x40) whose input channel is scaled down as much by the norm before it:
    the layer computes the same, but the outlier's absmax crushes the other weights of its blocks."""
    path = make_chat_model(tmp_path_factory.mktemp("ranked"))
    weights_file = path / "model.safetensors"
    weights = load_file(weights_file)
    for name in HARD:
        weights[f"{name}.weight"][:, 0] *= 40.0
        layer = name.rsplit(".self_attn", 1)[0]
        weights[f"{layer}.input_layernorm.weight"][0] /= 40.0
    save_file(weights, weights_file, metadata={"format": "pt"})
    return path


def test_weighted_error_counts_only_live_input_channels():
    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    weight[:, 0] *= 40.0                 # crushes columns 0-63 of every row (one 64-block per half row)
    packed, state = quantize_nf4(weight)
    plain = relative_error(weight, packed, state)
    assert weighted_relative_error(weight, packed, state, torch.ones(128)) == pytest.approx(plain, rel=1e-5)
    live_right = torch.cat([torch.zeros(64), torch.ones(64)])     # only the untouched half is fed
    live_left = torch.cat([torch.zeros(1), torch.ones(63), torch.zeros(64)])  # the crushed weights only
    right = weighted_relative_error(weight, packed, state, live_right)
    left = weighted_relative_error(weight, packed, state, live_left)
    assert right < 0.15                       # ordinary NF4 rounding noise
    assert left > 3 * right                   # crushed to a few levels by the outlier's absmax
    assert left > 3 * plain                   # the weight error hides them behind the outlier's norm
    with pytest.raises(ValueError, match="one value per input channel"):
        weighted_relative_error(weight, packed, state, torch.ones(64))


def test_dynamic_keeps_the_largest_activation_weighted_errors(folder):
    model, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True,
                                           keep_16bit=["embed_tokens"], keep_16bit_dynamic=2)
    report = model.quant_report
    assert report.ranking == "activation"
    dynamic = {n for n, why in report.kept.items() if why == "dynamic"}
    assert dynamic == set(HARD)
    errors = report.errors
    assert len(errors) == 2 * 7 and set(sorted(errors, key=errors.get)[-2:]) == set(HARD)
    assert min(errors[n] for n in HARD) > 2 * max(e for n, e in errors.items() if n not in HARD)
    summary = report.summary()
    assert "activation-weighted" in summary and all(n in summary for n in HARD)
    for name in HARD:
        assert type(model.get_submodule(name)) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.v_proj, Linear4bit)

    # Oracle: the same error from first principles, with inputs captured on the all-4-bit model.
    plain, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    quantized, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True,
                                       keep_16bit=["embed_tokens"])
    inputs: dict[str, torch.Tensor] = {}
    hooks = [quantized.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))) for n in errors]
    ids, positions = calibration_ids(tokenizer)
    with torch.no_grad():
        quantized.hidden_states(ids, position_ids=positions)
    for h in hooks:
        h.remove()
    for name, measured in errors.items():
        exact = plain.get_submodule(name).weight
        delta = quantized.get_submodule(name).dequantized_weight(torch.float32) - exact
        scale = inputs[name].square().mean(dim=0)
        expected = ((delta.square() * scale).sum() / (exact.square() * scale).sum()).sqrt().item()
        assert measured == pytest.approx(expected, rel=1e-4), name
    # the layers kept in 16-bit hold the checkpoint's weights exactly
    for name in HARD:
        assert torch.equal(model.get_submodule(name).weight, plain.get_submodule(name).weight)


def test_without_a_tokenizer_the_ranking_is_the_weight_error(folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in ("config.json", "model.safetensors"):
        (bare / file).write_bytes((folder / file).read_bytes())
    model, tokenizer = velotune.load_model(bare, dtype=torch.float32, device="cpu", load_in_4bit=True,
                                           keep_16bit=["embed_tokens"], keep_16bit_dynamic=1)
    assert tokenizer is None and model.quant_report.ranking == "weight"
    assert "largest weight quantization error" in model.quant_report.summary()


@pytest.mark.parametrize(("count", "message"), [(-1, "keep_16bit_dynamic must not be negative"),
                                                 (15, "keep_16bit_dynamic=15 is more than the 14 linear")])
def test_bad_keep_16bit_dynamic_names_the_field(folder, count, message):
    with pytest.raises(LoadError, match=message):
        velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True,
                            keep_16bit=["embed_tokens"], keep_16bit_dynamic=count)


def test_keep_16bit_dynamic_may_keep_every_linear(folder):
    model, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True,
                                   keep_16bit=["embed_tokens"], keep_16bit_dynamic=14)
    assert model.quant_report.quantized == [] and not any(isinstance(m, Linear4bit) for m in model.modules())
