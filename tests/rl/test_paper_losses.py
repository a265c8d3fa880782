"""KTO, SimPO and the GRPO loss variants against plain transcriptions of the papers' formulas, on
fixed per-token log-probabilities. The objectives are run end to end (masking, per-sequence sums
and means, the count they divide by) through a stand-in for the trainer that returns the fixed
log-probabilities instead of a model's, so what is compared is our reading of the papers:

- KTO (Ethayarajh et al. 2024, eq. 8): r(x, y) = log pi(y|x) - log ref(y|x);
  z0 = max(0, mean of r over mismatched pairs (x, y')), no gradient;
  v = lambda_D sigmoid(beta (r - z0)) if desirable, lambda_U sigmoid(beta (z0 - r)) if not;
  loss = mean over examples of lambda_y - v.
- SimPO (Meng et al. 2024, eq. 6): loss = -log sigmoid(beta/|y_w| log pi(y_w|x) -
  beta/|y_l| log pi(y_l|x) - gamma), averaged over pairs.
- GRPO normalisations: grpo (1/G) sum_i (1/|o_i|) sum_t l_it (Shao et al. 2024); dr_grpo
  (1/(G L_max)) sum_it l_it (Liu et al. 2025); dapo/bnpo sum_it l_it / sum_i |o_i| (Yu et al.
  2025); GSPO (Zheng et al. 2025): ratio s_i = exp((1/|o_i|) sum_t (log pi - log pi_old)).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from velotune.distributed import World
from velotune.rl.grpo import CLIP_EPS
from velotune.rl.kto import KTOExample, KTOObjective
from velotune.rl.losses import grpo_count, grpo_loss_sum, grpo_token_loss
from velotune.rl.preference import PairObjective, PreferenceExample


def logp_of(token: int, position: int, reference: bool) -> float:
    """The fixed log-probability of `token` at `position` (under the reference, or the policy)."""
    return -(0.13 * (token % 7) + 0.05 * position + 0.2) if reference else -(0.11 * (token % 5) + 0.04 * position + 0.1)


class FixedRunner:
    """What an objective asks of the trainer, answering with `logp_of` instead of a model."""

    device = torch.device("cpu")
    world = World()
    model = torch.nn.Module()

    def forward(self, batch, *, reference=False):
        ids, labels = batch["input_ids"], batch["labels"]
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64)
        for r in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                if labels[r, t + 1] != -100:
                    out[r, t] = logp_of(int(ids[r, t + 1]), t + 1, reference)
        return SimpleNamespace(token_logps=out)

    def global_sum(self, value):
        return value.clone()


def completion_logp(prompt: list[int], completion: list[int], reference: bool) -> float:
    return sum(logp_of(tok, len(prompt) + i, reference) for i, tok in enumerate(completion))


def kto_paper(examples, beta, lambda_d, lambda_u) -> float:
    r = [completion_logp(e.prompt_ids, e.completion_ids, False) - completion_logp(e.prompt_ids, e.completion_ids, True)
         for e in examples]
    mismatched = [completion_logp(e.prompt_ids, e.kl_completion_ids, False)
                  - completion_logp(e.prompt_ids, e.kl_completion_ids, True) for e in examples]
    z0 = max(0.0, sum(mismatched) / len(mismatched))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses = [(lambda_d - lambda_d * sigmoid(beta * (ri - z0))) if e.desirable
              else (lambda_u - lambda_u * sigmoid(beta * (z0 - ri))) for e, ri in zip(examples, r)]
    return sum(losses) / len(losses)


def kto_examples() -> list[KTOExample]:
    spec = [([5, 6, 7], [9, 10, 11, 2], True), ([5, 6, 7], [3, 2], False), ([8, 1], [4, 4, 4, 4, 4, 2], True),
            ([12, 13, 14, 15], [2], False), ([8, 1], [30, 31, 2], False)]
    examples = [KTOExample(p, c, d, f"row {i}") for i, (p, c, d) in enumerate(spec)]
    for i, e in enumerate(examples):   # mismatched: the next example with another prompt
        e.kl_completion_ids = next(examples[(i + k) % len(examples)].completion_ids for k in range(1, len(examples))
                                   if examples[(i + k) % len(examples)].prompt_ids != e.prompt_ids)
    return examples


@pytest.mark.parametrize("split", [[5], [2, 3], [1, 1, 1, 1, 1]])
def test_kto_objective_equals_the_paper_whatever_the_micro_batches(split):
    examples = kto_examples()
    runner, objective = FixedRunner(), KTOObjective(pad_id=0, beta=0.7, desirable_weight=1.3, undesirable_weight=0.6)
    starts = [sum(split[:i]) for i in range(len(split))]
    batches = objective.micro_batches(runner, [examples[s:s + n] for s, n in zip(starts, split)], 0)
    total = sum(float(objective.loss(runner, b)[0]) for b in batches)
    count = sum(objective.count(b) for b in batches)
    assert count == 5
    assert total / count == pytest.approx(kto_paper(examples, 0.7, 1.3, 0.6), rel=1e-7)   # z0 is float32


def test_kto_reference_point_is_clamped_at_zero():
    examples = kto_examples()
    runner = FixedRunner()
    [batch] = KTOObjective(pad_id=0, beta=0.1).micro_batches(runner, [examples], 0)
    mismatched = [completion_logp(e.prompt_ids, e.kl_completion_ids, False)
                  - completion_logp(e.prompt_ids, e.kl_completion_ids, True) for e in examples]
    assert float(batch["z0"]) == pytest.approx(max(0.0, sum(mismatched) / 5), rel=1e-6)


def simpo_paper(pairs, beta, gamma) -> float:
    total = 0.0
    for p in pairs:
        w = completion_logp(p.prompt_ids, p.chosen_ids, False) / len(p.chosen_ids)
        lose = completion_logp(p.prompt_ids, p.rejected_ids, False) / len(p.rejected_ids)
        total += -math.log(1 / (1 + math.exp(-(beta * w - beta * lose - gamma))))
    return total / len(pairs)


def test_simpo_objective_equals_the_paper():
    pairs = [PreferenceExample([5, 6], [7, 8, 9, 2], [3, 2], "a"), PreferenceExample([1, 2, 3], [4, 2], [9, 9, 9, 9, 9, 2], "b"),
             PreferenceExample([11], [12, 13, 2], [14, 2], "c")]
    runner, objective = FixedRunner(), PairObjective("simpo", pad_id=0, beta=2.5, gamma=1.4)
    batches = objective.micro_batches(runner, [pairs[:1], pairs[1:]], 0)
    total = sum(float(objective.loss(runner, b)[0]) for b in batches)
    assert total / sum(objective.count(b) for b in batches) == pytest.approx(simpo_paper(pairs, 2.5, 1.4), rel=1e-12)


def grpo_paper(logp, old, ref, adv, lengths, beta, loss_type, l_max, sequence_ratio) -> float:
    per_seq, tokens = [], 0
    for i in range(len(logp)):
        n = lengths[i]
        ratios = [math.exp(logp[i][t] - old[i][t]) for t in range(n)]
        if sequence_ratio:
            ratios = [math.exp(sum(logp[i][t] - old[i][t] for t in range(n)) / n)] * n
        terms = []
        for t in range(n):
            clipped = min(max(ratios[t], 1 - CLIP_EPS), 1 + CLIP_EPS)
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            terms.append(-min(ratios[t] * adv[i], clipped * adv[i]) + beta * kl)
        per_seq.append(terms)
        tokens += n
    if loss_type == "grpo":
        return sum(sum(s) / len(s) for s in per_seq) / len(per_seq)
    if loss_type == "dr_grpo":
        return sum(map(sum, per_seq)) / (len(per_seq) * l_max)
    return sum(map(sum, per_seq)) / tokens


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("sequence_ratio", [False, True])
def test_grpo_normalisations_equal_the_papers(loss_type, sequence_ratio):
    g = torch.Generator().manual_seed(1)
    lengths = [5, 2, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths], dtype=torch.float64)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    old = logp + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.2
    adv = torch.tensor([1.1, -0.4, 0.7], dtype=torch.float64)
    per_token = grpo_token_loss(logp, old, ref, adv, clip_eps=CLIP_EPS, beta=0.05, mask=mask if sequence_ratio else None)
    got = float(grpo_loss_sum(per_token, mask, loss_type)) / grpo_count(mask, loss_type, 6)
    want = grpo_paper(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), lengths, 0.05, loss_type, 6, sequence_ratio)
    assert got == pytest.approx(want, rel=1e-12)
