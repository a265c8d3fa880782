"""The static-shape decode step (infer/static.py) on the CPU, eagerly: the same ids as the
dynamic step and as transformers' greedy `generate`, with padding, span buckets, LoRA, 4-bit bases,
sliding windows and soft-caps, stop tokens, and weights changed in place between steps."""
import pytest
import torch

from velotune.infer.engine import GenerationRun, generate_tensor, left_pad
from velotune.infer.sampling import SamplingParams
from velotune.infer.static import MIN_SPAN, span_for
from velotune.lora import LoraConfig, apply_lora
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.quant import quantize_linears

PROMPTS = [[5, 9, 13], [7, 2, 11, 4, 19, 3, 8, 30, 41], [1], [22, 17, 6, 6, 40]]
LLAMA = dict(model_type="llama", vocab_size=53, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=0)
# Gemma 2's quirks: sliding window on alternate layers, soft-capped scores and logits, (1+w) norms,
# sandwich norms, scaled embeddings.
GEMMA2 = dict(LLAMA, model_type="gemma2", sliding_window=6, layer_types=["sliding_attention", "full_attention"],
              attn_logit_softcapping=20.0, final_logit_softcapping=15.0, norm_weight_offset=1.0,
              sandwich_norms=True, embedding_multiplier=8.0, hidden_act="gelu_pytorch_tanh")


def random_model(fields: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**fields)).eval()
    with torch.no_grad():  # well-separated logits, so greedy ids do not hinge on rounding
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def with_lora(model: Transformer) -> Transformer:
    # init=False: B starts non-zero, so the adapters change every projection's output
    return apply_lora(model, LoraConfig(r=4, alpha=8, init=False))


def decoded(model, prompts, decode, max_new_tokens=12, **kw):
    """Generated ids per row (up to its stop token), prompts left-padded in one batch."""
    params = SamplingParams(max_new_tokens=max_new_tokens, decode=decode, **{"stop_token_ids": [], **kw})
    ids, mask = left_pad(prompts, 0, next(model.parameters()).device)
    run = GenerationRun(model, ids, mask, params, params.stop_token_ids)
    while run.step() is not None:
        pass
    return [run.token_ids(r) for r in range(len(prompts))]


@pytest.mark.parametrize("fields", [LLAMA, GEMMA2], ids=["llama", "gemma2"])
def test_static_equals_dynamic_across_span_buckets(fields):
    model = random_model(fields)
    # 9-token prompt + 70 new tokens: the steps cross the first span bucket (64 columns)
    static = decoded(model, PROMPTS, "static", max_new_tokens=70)
    assert static == decoded(model, PROMPTS, "dynamic", max_new_tokens=70)
    assert all(len(ids) == 70 for ids in static)
    assert len({tuple(ids) for ids in static}) == len(PROMPTS)  # rows really differ


def test_static_with_lora_active_equals_dynamic():
    model = with_lora(random_model(LLAMA))
    static = decoded(model, PROMPTS, "static")
    assert static == decoded(model, PROMPTS, "dynamic")
    with torch.no_grad():  # and the adapters matter: without them the ids differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert decoded(model, PROMPTS, "static") != static


def test_static_with_4bit_base_and_lora_equals_dynamic():
    model = random_model(dict(LLAMA, hidden_size=128, intermediate_size=192, head_dim=32))
    assert len(quantize_linears(model)) == 14
    model = with_lora(model)
    assert decoded(model, PROMPTS, "static") == decoded(model, PROMPTS, "dynamic")


def test_static_stop_tokens_and_seeded_sampling_equal_dynamic():
    model = random_model(LLAMA)
    free = decoded(model, PROMPTS, "dynamic", max_new_tokens=16)
    stop = free[1][5]
    for kw in (dict(stop_token_ids=[stop]), dict(temperature=1.0, top_p=0.9, top_k=20, min_p=0.05,
                                                 repetition_penalty=1.3, seed=7)):
        static = decoded(model, PROMPTS, "static", max_new_tokens=16, **kw)
        assert static == decoded(model, PROMPTS, "dynamic", max_new_tokens=16, **kw)
    static = decoded(model, PROMPTS, "static", max_new_tokens=16, stop_token_ids=[stop])
    assert static[1] == free[1][: free[1].index(stop) + 1]


def test_static_equals_model_generate_left_padded():
    model = random_model(LLAMA)
    ids, mask = left_pad(PROMPTS, 0, torch.device("cpu"))
    eager = model.generate(ids, max_new_tokens=10, attention_mask=mask, stop_token_ids=[], decode="dynamic")
    static = generate_tensor(model, ids, SamplingParams(max_new_tokens=10, decode="static"),
                             attention_mask=mask, stop_token_ids=[])
    assert torch.equal(eager, static)


def test_static_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    import velotune

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
    ref.save_pretrained(tmp_path)
    ours, _ = velotune.load_model(tmp_path, dtype=torch.float32, device="cpu")
    ids, mask = left_pad(PROMPTS, 0, torch.device("cpu"))
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                            pad_token_id=0)
    got = generate_tensor(ours, ids, SamplingParams(max_new_tokens=20, decode="static"), attention_mask=mask,
                          stop_token_ids=[])
    assert got.tolist() == expected.tolist()


def runs(model, decode: str, n: int) -> GenerationRun:
    """A run over PROMPTS after `n` steps."""
    ids, mask = left_pad(PROMPTS, 0, next(model.parameters()).device)
    run = GenerationRun(model, ids, mask, SamplingParams(max_new_tokens=8, decode=decode, stop_token_ids=[]), [])
    for _ in range(n):
        run.step()
    return run


def check_in_place_update_is_seen(model, decode: str) -> None:
    """Runs built before an in-place weight change use the new weights in their next step."""
    subject, reference, old = runs(model, decode, 2), runs(model, "dynamic", 2), runs(model, decode, 3)
    if decode == "graph":
        assert subject.decoder.graphs, "the first decode step should have captured a graph"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    subject.step()
    reference.step()
    torch.testing.assert_close(subject.logits.float(), reference.logits.float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(subject.logits.float(), old.logits.float(), atol=1e-2)


def test_in_place_weight_update_is_seen_by_the_static_step():
    check_in_place_update_is_seen(with_lora(random_model(LLAMA)), "static")


def test_span_buckets():
    assert MIN_SPAN == 64
    assert [span_for(c, 1000) for c in (0, 63, 64, 127, 128, 600)] == [64, 64, 128, 128, 256, 1000]
    assert span_for(515, 520) == 520  # capped at the cache length


def test_decode_modes_are_checked():
    with pytest.raises(ValueError, match="decode must be one of"):
        SamplingParams(decode="fast")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        decoded(random_model(LLAMA), PROMPTS, "graph")


# GPU: the CUDA-graph replay of the same step.

def cuda_model(fields: dict, dtype: torch.dtype, *, four_bit: bool = False) -> Transformer:
    """A random model with LoRA active (over a 4-bit base if asked) on the GPU."""
    model = random_model(fields).to("cuda", dtype)
    if four_bit:
        quantize_linears(model)
    return with_lora(model)


def graph_and_static(model, max_new_tokens: int) -> tuple[list[list[int]], list[list[int]], set[int]]:
    ids, mask = left_pad(PROMPTS, 0, torch.device("cuda"))
    out = {}
    for decode in ("graph", "static"):
        run = GenerationRun(model, ids, mask, SamplingParams(max_new_tokens=max_new_tokens, decode=decode,
                                                              stop_token_ids=[]), [])
        while run.step() is not None:
            pass
        out[decode] = ([run.token_ids(r) for r in range(len(PROMPTS))], set(run.decoder.graphs))
    return out["graph"][0], out["static"][0], out["graph"][1]


@pytest.mark.gpu
def test_graph_replay_equals_eager_static_float32():
    model = cuda_model(LLAMA, torch.float32)
    graph, static, spans = graph_and_static(model, 70)
    assert spans == {64, 79}  # both buckets were captured (the second capped at the cache's 9 + 70)
    assert graph == static
    assert graph == decoded(model, PROMPTS, "dynamic", 70)


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [LLAMA, GEMMA2], ids=["llama", "gemma2"])
def test_graph_replay_equals_eager_static_bf16(fields):
    model = cuda_model(dict(fields, hidden_size=256, intermediate_size=512, head_dim=64), torch.bfloat16)
    graph, static, spans = graph_and_static(model, 40)
    assert spans == {49}
    assert graph == static


@pytest.mark.gpu
def test_graph_replay_with_4bit_base_and_lora():
    model = cuda_model(dict(LLAMA, hidden_size=256, intermediate_size=512, head_dim=64), torch.bfloat16,
                       four_bit=True)
    graph, static, spans = graph_and_static(model, 40)
    assert spans == {49}
    assert graph == static


@pytest.mark.gpu
def test_in_place_weight_update_is_seen_by_the_graph():
    check_in_place_update_is_seen(cuda_model(LLAMA, torch.float32), "graph")

