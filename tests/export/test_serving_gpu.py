"""On the GPU: AWQ/GPTQ export of a larger random-weight Llama (the quantizers run on CUDA), loaded
by transformers with compressed-tensors in bfloat16 and generating; logits against velotune's
dequantized model within bf16 tolerance; vLLM generates from the folder where its wheel is there."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_serving import dequantized_folder

import velotune
from velotune.export import export

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

SIZE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=4, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def model(bpe_tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m = tiny_model("llama", bpe_tokenizer.vocab_size, seed=4, **SIZE)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.02)
    return m.cuda().eval()


@pytest.mark.parametrize("to,quant", [("awq", "w4a16_asym"), ("gptq", "w4a16"), ("awq", "w4a16")])
def test_transformers_generates_from_the_export(model, bpe_tokenizer, tmp_path, to, quant):
    folder = export(model, to=to, quant=quant, out=tmp_path / to, tokenizer=bpe_tokenizer)
    ours, _ = velotune.load_model(dequantized_folder(folder, tmp_path / "plain"), dtype=torch.bfloat16,
                                  device="cuda")
    extra = {} if quant == "w4a16" else {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **extra).cuda().eval()
    ids = torch.randint(3, bpe_tokenizer.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected, got = ours.eval()(ids).logits.float(), ref(ids).logits.float()
        generated = ref.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 4 * 2**-7 * scale, float((got - expected).abs().max() / scale)
    assert generated.shape == (1, 16)


def test_vllm_generates_from_the_export(model, bpe_tokenizer, tmp_path):
    vllm = pytest.importorskip("vllm")
    folder = export(model, to="gptq", out=tmp_path / "gptq", tokenizer=bpe_tokenizer)
    llm = vllm.LLM(model=str(folder), dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True)
    out = llm.generate(["Hello there"], vllm.SamplingParams(max_tokens=8, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 8
