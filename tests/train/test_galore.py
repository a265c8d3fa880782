"""GaLoreAdamW: equal to torch's AdamW when nothing is compressed, moments in the low-rank space
when something is, an exact state_dict round trip, a falling loss at low rank, and the trainer's
grouping (decoder projections projected, the rest plain AdamW)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.train.config import TrainConfig
from velotune.train.galore import GaLoreAdamW, build_galore


def params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g)) for shape in ((12, 20), (20, 12), (7,), (3, 4, 5))]


def set_grads(ps: list[nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def test_full_rank_scale_one_equals_adamw():
    ours, ref = params(), params()
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = GaLoreAdamW([{"params": ours[:2], "rank": 12, "scale": 1.0}, {"params": ours[2:]}], update_proj_gap=3, **kw)
    torch_opt = torch.optim.AdamW(ref, **kw)
    for step in range(8):
        set_grads(ours, step)
        set_grads(ref, step)
        opt.step()
        torch_opt.step()
        for mine, theirs in zip(ours, ref):
            assert torch.allclose(mine, theirs, rtol=0, atol=1e-6), f"step {step}"
    assert "projector" not in opt.state[ours[0]]  # nothing to compress: no SVD


def test_low_rank_moments_and_projector_shapes():
    ps = params()
    opt = GaLoreAdamW([{"params": ps[:2], "rank": 3}], lr=0.01)
    set_grads(ps, 0)
    opt.step()
    tall, wide = opt.state[ps[0]], opt.state[ps[1]]      # [12, 20] projects on the left, [20, 12] on the right
    assert tall["projector"].shape == (12, 3) and tall["exp_avg"].shape == (3, 20)
    assert wide["projector"].shape == (12, 3) and wide["exp_avg_sq"].shape == (20, 3)
    eye = torch.eye(3)
    assert torch.allclose(tall["projector"].t() @ tall["projector"], eye, atol=1e-5)
    # The first update lies in the span of the gradient's top-3 left singular vectors.
    before = params()[0]
    delta = ps[0].detach() - before
    proj = tall["projector"]
    assert torch.allclose(proj @ (proj.t() @ delta), delta, atol=1e-6)
    assert delta.abs().max() > 1e-3


def test_projector_refreshes_every_gap_steps():
    ps = params()[:1]
    opt = GaLoreAdamW([{"params": ps, "rank": 2}], lr=0.01, update_proj_gap=3)
    seen = []
    for step in range(7):
        set_grads(ps, step)
        opt.step()
        seen.append(opt.state[ps[0]]["projector"].clone())
    same = [torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert same == [True, True, False, True, True, False]   # new SVD at steps 0, 3, 6


def test_state_dict_round_trip_is_exact():
    ps = params()
    kw = dict(lr=0.02, weight_decay=0.01, update_proj_gap=4)
    opt = GaLoreAdamW([{"params": ps[:2], "rank": 3, "scale": 0.5}, {"params": ps[2:]}], **kw)
    for step in range(6):
        set_grads(ps, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [nn.Parameter(p.detach().clone()) for p in ps]
    resumed = GaLoreAdamW([{"params": resumed_params[:2], "rank": 3, "scale": 0.5},
                           {"params": resumed_params[2:]}], **kw)
    resumed.load_state_dict(saved)
    for step in range(6, 11):
        set_grads(ps, step)
        set_grads(resumed_params, step)
        opt.step()
        resumed.step()
    for a, b in zip(ps, resumed_params):
        assert torch.equal(a, b)
    assert resumed.state_dict()["state"][0]["step"].item() == 11


def test_low_rank_regression_loss_falls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    target = x @ torch.randn(32, 24, generator=g)
    weight = nn.Parameter(torch.zeros(32, 24))
    opt = GaLoreAdamW([{"params": [weight], "rank": 4}], lr=0.1, update_proj_gap=20, scale=1.0)
    losses = []
    for _ in range(200):
        loss = ((x @ weight - target) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])
    assert opt.state[weight]["exp_avg"].numel() == 4 * 32  # [24 < 32: right side] -> [32, 4]


def test_build_galore_projects_the_decoder_linears():
    config = ModelConfig.from_hf_config(dict(
        model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False))
    model = Transformer(config)
    train = TrainConfig(optimizer="galore", galore_rank=4, galore_update_proj_gap=5, galore_scale=0.5,
                        learning_rate=1e-3, weight_decay=0.1)
    from velotune.train.optim import parameter_groups

    opt = build_galore(model, parameter_groups(model, train.weight_decay), train)
    names = {id(p): n for n, p in model.named_parameters()}
    by_rank = {}
    for group in opt.param_groups:
        by_rank.setdefault(group["rank"], set()).update(names[id(p)] for p in group["params"])
    assert by_rank[4] == {f"model.layers.0.{m}.weight" for m in
                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= by_rank[None]
    galore_group = next(g for g in opt.param_groups if g["rank"] == 4)
    assert galore_group["scale"] == 0.5 and galore_group["update_proj_gap"] == 5 and galore_group["weight_decay"] == 0.1


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(update_proj_gap=0), "update_proj_gap must be a positive integer"),
    (dict(betas=(0.9, 1.0)), "betas must be in"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW(params(), **kwargs)
