"""The long-context estimator (`velotune.models.long_context`) and `velotune estimate --seq max`:
the H100 measurements it must meet, the terms it sums, and the search for the longest length."""
from __future__ import annotations

import pytest

from velotune.__main__ import main
from velotune.estimate import GIB, EstimateError, Setup
from velotune.models.known_configs import load_config
from velotune.models.long_context import (
    attention_backward_terms,
    context_estimate,
    grpo_estimate,
    grpo_longest_completion,
    kv_cache_per_token,
    longest_context,
)

H100_GIB = 79.6          # torch.cuda.get_device_properties(0).total_memory of the H100 80GB HBM3
# benchmarks/RESULTS.md "Long-context training (QLoRA, batch 1)", 2026-11-23: Llama-3.1-8B QLoRA r16,
# every layer input offloaded whole (85.4 GiB pinned at 350,000 tokens), peak allocated GiB.
MEASURED_H100 = [(262_144, 33.9), (350_000, 43.4)]


def llama8b():
    return load_config("Llama-3.1-8B")[0]


@pytest.mark.parametrize(("seq", "measured"), MEASURED_H100)
def test_gpu_peak_within_5_percent_of_the_h100_rows(seq, measured):
    est = context_estimate(llama8b(), Setup(method="qlora"), seq, H100_GIB, host_gib=122, keep_attention=False)
    assert est.placement.offloaded == 32 and set(est.placement.pieces) == {1}   # as the rows ran
    assert not any(est.placement.kept)
    assert est.moment == "attention backward"
    assert est.gpu_total / GIB == pytest.approx(measured, rel=0.05)


def test_attention_backward_terms_of_llama_8b():
    c = llama8b()
    h, q, kv, heads, r = 4096, 4096, 1024, 32, 16
    expected = (2 * h + 2 * (q + 2 * kv) + 2 * q + 4 * heads + 8       # the attention half kept for backward
                + 2 * 2 * h + 2 * q                                     # residual/output gradients, d(attention)
                + 4 * q + 2 * (q + 2 * kv) + 2 * 2 * q                   # flash backward, grouped-query dk/dv
                + 2 * 7 * r)                                             # LoRA X @ A
    assert sum(t.per_token for t in attention_backward_terms(c, Setup(method="qlora", lora_r=r))) == expected
    qwen = load_config("Qwen3-8B")[0]
    plain = sum(t.per_token for t in attention_backward_terms(llama8b(), Setup(method="full")))
    assert sum(t.per_token for t in attention_backward_terms(qwen, Setup(method="full"))) > plain  # q/k norms


def test_longest_context_is_the_last_length_that_fits_and_says_why_the_next_fails():
    c, setup = llama8b(), Setup(method="qlora")
    best, nxt = longest_context(c, setup, H100_GIB, host_gib=122)
    assert nxt.seq == best.seq + 1 and best.fits and not nxt.fits
    assert best.seq >= 500_000                       # the target, with the host full and the GPU the rest
    assert best.placement.kept_on_gpu > 0 and best.placement.host_bytes <= best.host_budget
    assert nxt.why_not().startswith("GPU:") and "kept on the GPU, the host being full" in nxt.why_not()
    # less host memory keeps more checkpoints on the GPU, so the longest length is shorter; without the
    # placement (every input in host memory, as before) it is the host that ends it
    smaller, _ = longest_context(c, setup, H100_GIB, host_gib=64)
    assert smaller.seq < best.seq and smaller.placement.kept_on_gpu > best.placement.kept_on_gpu
    host_only, failing = longest_context(c, setup, H100_GIB, host_gib=122, kept_on_gpu=0)
    assert host_only.seq < best.seq and failing.why_not().startswith("host:")
    # a huge host: every input in host memory, still whole (pieces would cost GPU memory in flight)
    roomy, _ = longest_context(c, setup, H100_GIB, host_gib=1000)
    assert roomy.seq > best.seq and roomy.placement.kept_on_gpu == 0 and set(roomy.placement.pieces) == {1}


def test_models_it_does_not_model_are_refused_by_name():
    with pytest.raises(EstimateError, match="soft-capped attention"):
        context_estimate(load_config("gemma-2-9b")[0], Setup(), 1000, H100_GIB, 100)
    with pytest.raises(EstimateError, match="gpu-gib must exceed"):
        longest_context(llama8b(), Setup(), 1.0, 100)


def test_estimate_seq_max_command(capsys):
    best, nxt = longest_context(llama8b(), Setup(method="qlora"), H100_GIB, host_gib=122)
    assert main(["estimate", "Llama-3.1-8B", "--seq", "max", "--gpu-gib", str(H100_GIB), "--host-gib", "122"]) == 0
    out = capsys.readouterr().out
    assert f"Longest context: {best.seq:,} tokens" in out
    assert f"{nxt.seq:,} tokens does not fit: GPU" in out and "layer inputs in host memory" in out
    assert "max_position_embeddings" in out
    assert main(["estimate", "Llama-3.1-8B", "--seq", "max"]) == 2
    assert "--seq max needs --gpu-gib" in capsys.readouterr().err
    assert main(["estimate", "Llama-3.1-8B", "--seq", "1024", "--host-gib", "10"]) == 2
    assert "--host-gib and --grpo-batch apply to --seq max only" in capsys.readouterr().err


def test_grpo_longest_completion_is_bound_by_the_kv_cache_of_the_rows_decoded_at_once(capsys):
    """Qwen3-8B QLoRA GRPO on an H100: the KV cache (147,456 B a token) of the rows decoded together
    binds first; one row at a time, the update binds. Decoding two at a time already reaches twice
    the 110,000-token completions reported for Qwen3-8B GRPO on an 80 GB H100 (Unsloth)."""
    qwen, setup = load_config("Qwen3-8B")[0], Setup(method="qlora")
    assert kv_cache_per_token(qwen) == 2 * 2 * 36 * 8 * 128
    lengths = {}
    for rows in (8, 2, 1):
        best, nxt = grpo_longest_completion(qwen, setup, 256, rows, H100_GIB, host_gib=122)
        assert best.fits and not nxt.fits and nxt.completion == best.completion + 1
        lengths[rows] = best.completion
        if rows > 1:
            assert nxt.why_not().startswith("generation: the KV cache of")
            cache = rows * (256 + best.completion) * kv_cache_per_token(qwen)
            assert best.generation_gpu >= best.training.resident + cache
    assert lengths[8] < lengths[2] < lengths[1] and lengths[2] >= 220_000
    assert grpo_estimate(qwen, setup, 256, lengths[1] + 1, 1, H100_GIB, 122).why_not().startswith("update: GPU")
    assert main(["estimate", "Qwen3-8B", "--seq", "max", "--gpu-gib", str(H100_GIB), "--host-gib", "122",
                 "--grpo-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert f"Longest completion: {lengths[2]:,} tokens" in out and "does not fit: generation" in out
