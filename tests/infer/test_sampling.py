"""Sampling processors on hand-checked numbers."""
import math

import pytest
import torch

from velotune.infer.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0, math.log(0.5)]])


def kept(params):
    return torch.isfinite(filter_logits(LOGITS, params))[0].tolist()


def test_top_k_keeps_k_largest():
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [True, True, False, False, False]


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = LOGITS.softmax(-1)[0]  # 0.617, 0.227, 0.084, 0.031, 0.042
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert kept(SamplingParams(temperature=1.0, top_p=0.7)) == [True, True, False, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.6)) == [True, False, False, False, False]


def test_min_p_is_relative_to_the_top_probability():
    # p_max = 0.617; min_p 0.3 keeps p >= 0.185: only tokens 0 and 1 (0.227)
    assert kept(SamplingParams(temperature=1.0, min_p=0.3)) == [True, True, False, False, False]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    seen = torch.tensor([[True, False, False, True, False]])
    out = apply_repetition_penalty(LOGITS, seen, 2.0)
    assert out[0].tolist() == pytest.approx([1.0, 1.0, 0.0, -2.0, math.log(0.5)])


def test_greedy_and_seeded_sampling_are_deterministic():
    assert sample(LOGITS, SamplingParams(temperature=0.0)).item() == 0
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p = SamplingParams(temperature=1.0)
    draws1 = [sample(LOGITS, p, generator=g1).item() for _ in range(20)]
    draws2 = [sample(LOGITS, p, generator=g2).item() for _ in range(20)]
    assert draws1 == draws2 and len(set(draws1)) > 1


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0),
                                 dict(min_p=1.0), dict(repetition_penalty=0)])
def test_invalid_params_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
