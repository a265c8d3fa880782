"""The form's memory estimate on a GPU ("what fits"): the estimator's total against the GPU's
memory less the reserve, and when it does not fit, the config changes the out-of-memory advice
gives. The GPU is faked (its name and size) so the judgement is tested here; the real one runs
under -m gpu."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from velotune.estimate import GIB, RESERVED_GIB
from velotune.studio.launcher import check_form, estimate_for


def form(tmp_path, model, extra: str = ""):
    return check_form(tmp_path / "runs", "r", f"model: {model}\nmicro_batch_size: 64\nmax_seq_length: 512\n{extra}",
                      tmp_path)


def fake_gpu(monkeypatch, total_gib: float) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Fake GPU", total_memory=int(total_gib * GIB)))


def test_fits_on_a_large_gpu(tmp_path, monkeypatch, studio_model):
    fake_gpu(monkeypatch, 80)
    estimate = estimate_for(form(tmp_path, studio_model))
    assert estimate["fits"] is True and estimate["device"] == "Fake GPU, 80.0 GiB"
    assert estimate["budget_gib"] == pytest.approx(80 - RESERVED_GIB)


def test_what_fits_when_it_does_not(tmp_path, monkeypatch, studio_model):
    config = form(tmp_path, studio_model)
    needed = estimate_for(config)["total_gib"]
    fake_gpu(monkeypatch, RESERVED_GIB + needed * 0.6)
    estimate = estimate_for(config)
    assert estimate["fits"] is False and estimate["fixes"]
    assert any("--micro_batch_size=" in fix or "--gradient_checkpointing=auto" in fix for fix in estimate["fixes"])


def test_an_unreadable_model_gives_a_reason_not_a_failure(tmp_path):
    (tmp_path / "empty").mkdir()
    estimate = estimate_for(form(tmp_path, tmp_path / "empty"))
    assert estimate["error"].startswith("no estimate: ")


@pytest.mark.gpu
def test_the_real_gpu(tmp_path, studio_model):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    estimate = estimate_for(form(tmp_path, studio_model))
    assert estimate["fits"] is True and torch.cuda.get_device_name(0) in estimate["device"]
