"""DPO, IPO, ORPO and GRPO losses and gradients on hand-checked numbers."""
import math

import pytest
import torch

from velotune.rl.losses import dpo_loss, group_advantages, grpo_token_loss, orpo_loss


def leaf(*values):
    return [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in values]


def test_dpo_sigmoid_value_and_gradient():
    pc, pr, rc, rr = leaf(-10.0, -12.0, -11.0, -11.0)
    out = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1)
    # h = 2, loss = -log sigmoid(0.2) = log(1 + e^-0.2)
    assert out.losses.item() == pytest.approx(0.598138869, abs=1e-8)
    out.losses.sum().backward()
    # dL/dpc = -beta * sigmoid(-beta h); dL/dpr is its negative
    assert pc.grad.item() == pytest.approx(-0.1 * 0.450166003, abs=1e-8)
    assert pr.grad.item() == pytest.approx(0.1 * 0.450166003, abs=1e-8)
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)


def test_dpo_label_smoothing():
    pc, pr, rc, rr = leaf(-10.0, -12.0, -11.0, -11.0)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * 0.598138869 + 0.1 * 0.798138869, abs=1e-8)


def test_ipo_value_and_gradient():
    pc, pr, rc, rr = leaf(-1.0, -1.5, -1.2, -1.2)
    out = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1, loss_type="ipo")
    # h = 0.5, loss = (0.5 - 5)^2 = 20.25, dL/dpc = 2 (h - 5) = -9
    assert out.losses.item() == pytest.approx(20.25)
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-9.0)


def test_orpo_value_and_gradient():
    ac, ar = leaf(math.log(0.5), math.log(0.25))
    nll = torch.tensor(2.0, dtype=torch.float64)
    loss, ratio = orpo_loss(ac, ar, nll, beta=0.1)
    # odds(0.5) = 1, odds(0.25) = 1/3: log-odds = log 3, log sigmoid(log 3) = log 0.75
    assert ratio.item() == pytest.approx(math.log(0.75))
    assert loss.item() == pytest.approx(2.0 - 0.1 * math.log(0.75))
    loss.backward()
    # d log-odds / d a_c = 1 / (1 - e^a_c) = 2; d log sigmoid(x)/dx = sigmoid(-x) = 0.25
    assert ac.grad.item() == pytest.approx(-0.1 * 0.25 * 2)


def test_unknown_dpo_loss_type():
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(*leaf(0.0, 0.0, 0.0, 0.0), loss_type="hinge")


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0]), group_size=2)
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert adv.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4),
                                          0.5 / (s + 1e-4), 0.0, 0.0])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), group_size=4)


def reference_grpo(logp, old, ref, adv, eps, beta):
    """The straightforward per-token loop."""
    out = torch.zeros(len(logp), len(logp[0]), dtype=torch.float64)
    for i in range(len(logp)):
        for t in range(len(logp[0])):
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            surrogate = min(ratio * adv[i], clipped * adv[i])
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            out[i, t] = -surrogate + beta * kl
    return out


def test_grpo_token_loss_equals_reference_loop():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3  # ratios both sides of the clip
    ref = logp + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.2
    adv = torch.tensor([1.3, -0.7, 0.0], dtype=torch.float64)
    got = grpo_token_loss(logp, old, ref, adv, clip_eps=0.2, beta=0.04)
    want = reference_grpo(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), 0.2, 0.04)
    assert torch.allclose(got, want.to(got.dtype), atol=1e-12)
