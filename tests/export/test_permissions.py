"""Exported files get the permissions any other file gets (0666 less the umask: 0644 under the
usual 022), not safetensors' owner-only 0600."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import tiny_model

from velotune.export import export
from velotune.lora import LoraConfig, apply_lora
from velotune.lora.peft_format import save_adapter


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def modes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_exports_and_adapters_are_readable_as_the_umask_says(tokenizer, tmp_path, umask):
    model = tiny_model("llama", len(tokenizer))
    export(model, to="hf", out=tmp_path / "hf", tokenizer=tokenizer)
    export(model, to="ollama", quant="q8_0", out=tmp_path / "ollama", tokenizer=tokenizer)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=2, alpha=4))
    save_adapter(model, tmp_path / "adapter", None)
    found = modes(tmp_path)
    assert {"hf/model.safetensors", "ollama/model.gguf", "ollama/Modelfile",
            "adapter/adapter_model.safetensors"} <= set(found)
    assert set(found.values()) == {0o666 & ~umask}, found
