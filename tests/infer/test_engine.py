"""The generation engine on a tiny model: batching, stop tokens, stop strings, streaming."""
import pytest
import torch

from velotune.infer.engine import generate, stream
from velotune.infer.sampling import SamplingParams
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i % 26); token 0 is the stop token."""
    stop_token_ids = [0]

    def encode(self, text):
        return [ord(c) - ord("a") + 1 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == 0))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=53, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      eos_token_id=0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(model):
    tok = CharTokenizer()
    prompts = [[5, 9, 13], [7, 2, 11, 4, 19, 3, 8], [1]]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[])
    batched = generate(model, tok, prompts, params)
    for prompt, got in zip(prompts, batched):
        alone = generate(model, tok, [prompt], params)[0]
        assert got.token_ids == alone.token_ids
        assert len(got.token_ids) == 12 and got.finish_reason == "length"


def test_row_seeds_make_each_sampled_row_independent_of_its_batch(model):
    tok = CharTokenizer()
    prompts = [[5, 9, 13], [7, 2, 11, 4, 19, 3, 8], [1], [5, 9, 13]]
    seeds = [11, 12, 13, 14]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=[], row_seeds=seeds)
    together = [c.token_ids for c in generate(model, tok, prompts, params)]
    apart = [generate(model, tok, prompts[i:i + 2], SamplingParams(max_new_tokens=10, temperature=1.0,
                                                                    stop_token_ids=[], row_seeds=seeds[i:i + 2]))
             for i in (0, 2)]
    assert together == [c.token_ids for pair in apart for c in pair]
    assert together[0] != together[3]          # same prompt, other seed: another sample
    with pytest.raises(ValueError, match="row_seeds holds 1 seeds for 4 prompts"):
        generate(model, tok, prompts, SamplingParams(temperature=1.0, row_seeds=[1]))


def test_greedy_equals_model_generate(model):
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    out = model.generate(ids, max_new_tokens=10, stop_token_ids=[])
    comp = generate(model, CharTokenizer(), [ids[0].tolist()], SamplingParams(max_new_tokens=10, stop_token_ids=[]))[0]
    assert out[0, 5:].tolist() == comp.token_ids


def test_stop_token_ends_a_row_and_pads(model):
    prompt = [4, 8, 15]
    free = generate(model, CharTokenizer(), [prompt], SamplingParams(max_new_tokens=10, stop_token_ids=[]))[0]
    stop = free.token_ids[3]
    comp = generate(model, CharTokenizer(), [prompt], SamplingParams(max_new_tokens=10, stop_token_ids=[stop]))[0]
    first = free.token_ids.index(stop)
    assert comp.token_ids == free.token_ids[: first + 1]
    assert comp.finish_reason == "stop"


def test_stop_string_cuts_the_text(model):
    tok = CharTokenizer()
    free = generate(model, tok, [[4, 8, 15]], SamplingParams(max_new_tokens=10, stop_token_ids=[]))[0]
    needle = free.text[4:6]
    comp = generate(model, tok, [[4, 8, 15]], SamplingParams(max_new_tokens=10, stop_token_ids=[], stop_strings=[needle]))[0]
    assert comp.finish_reason == "stop"
    assert comp.text == free.text[: free.text.find(needle)]
    assert len(comp.token_ids) < 10


def test_stream_yields_the_same_text(model):
    tok = CharTokenizer()
    params = SamplingParams(max_new_tokens=9, stop_token_ids=[])
    pieces = list(stream(model, tok, [4, 8, 15], params))
    assert len(pieces) > 1
    assert "".join(pieces) == generate(model, tok, [[4, 8, 15]], params)[0].text


def test_seeded_sampling_repeats(model):
    tok = CharTokenizer()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
    a = generate(model, tok, [[4, 8], [9]], params)
    b = generate(model, tok, [[4, 8], [9]], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, CharTokenizer(), [[]])
