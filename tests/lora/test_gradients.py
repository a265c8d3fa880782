"""Training through adapters: only adapter parameters get gradients, and they equal PEFT's on the
same batch (relative 1e-5), for LoRA and DoRA, with the head and embedding adapted too (the loss
reads the head through `lm_head.weight`, which must carry the adapter)."""
from __future__ import annotations

import pytest
import torch
from tests.lora.lora_helpers import batch, load_ours, make_reference, our_name, scatter_magnitudes

from velotune.lora import LoraConfig, apply_lora, lora_named_parameters, lora_parameters, save_adapter

peft = pytest.importorskip("peft")

CASES = {
    "lora": dict(target_modules="all-linear"),
    "dora": dict(target_modules="all-linear", use_dora=True),
    "rslora-embed-head": dict(target_modules=["q_proj", "down_proj", "embed_tokens", "lm_head"], use_rslora=True),
    "dora-embed-head": dict(target_modules=["k_proj", "gate_proj", "embed_tokens", "lm_head"], use_dora=True),
}


@pytest.mark.parametrize(("family", "case"), [("llama", "lora"), ("llama", "dora-embed-head"),
                                             ("qwen2", "dora"), ("qwen2", "rslora-embed-head")])
def test_gradients_match_peft(family, case, tmp_path):
    ref = make_reference(family, tmp_path / "base")
    ours = load_ours(tmp_path / "base")
    torch.manual_seed(3)
    apply_lora(ours, LoraConfig(r=4, alpha=8, init=False, **CASES[case]))
    scatter_magnitudes(ours.named_parameters())
    save_adapter(ours, tmp_path / "adapter", None)
    theirs = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter", is_trainable=True).eval()

    ids, labels = batch()
    ours(ids, labels=labels).loss.backward()
    theirs(input_ids=ids, labels=labels).loss.backward()

    adapter_ids = {id(p) for p in lora_parameters(ours)}
    for name, p in ours.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, f"{name} is a base parameter but got a gradient"

    mine = dict(lora_named_parameters(ours))
    reference = {our_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(reference) == sorted(mine)
    assert any("lora_magnitude_vector" in n for n in mine) == ("dora" in case)
    for name, ref_grad in reference.items():
        assert ref_grad.norm() > 0, name
        rel = (mine[name].grad - ref_grad).norm() / ref_grad.norm()
        assert rel <= 1e-5, f"{name}: relative gradient error {rel:.2e}"
