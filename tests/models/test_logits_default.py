"""`Transformer.forward`'s `return_logits` default: a forward given labels returns its loss without
the [tokens x vocab] logits (what a training loop needs), says how to get them when they are read,
and computes them when asked or when no labels are given."""
from __future__ import annotations

import pytest
import torch

from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer


def test_logits_come_with_labels_only_when_asked():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    ids = torch.randint(0, 64, (2, 7))
    lean = model(ids, labels=ids)
    with pytest.raises(AttributeError, match="return_logits=True"):
        lean.logits
    assert getattr(lean, "logits", None) is None
    full = model(ids, labels=ids, return_logits=True)
    assert torch.equal(full.loss, lean.loss) and full.logits.shape == (2, 7, 64)
    assert torch.equal(model(ids).logits, full.logits)
    assert model(ids, labels=ids, return_logits=False).logits is None   # asked for none: plainly None
