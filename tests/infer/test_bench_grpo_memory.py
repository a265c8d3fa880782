"""benchmarks/bench_grpo_memory.py on a tiny config on the CPU: the code path the H100 run takes
(bf16 build, NF4 projections, LoRA, one optimizer step of the trainer with method grpo: a group
sampled by the engine, scored, accumulated over two micro-batches)."""
import math
from pathlib import Path

import torch

TINY = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def test_bench_grpo_memory_runs_one_step_on_cpu(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))
    import bench_grpo_memory

    r = bench_grpo_memory.run(TINY, group=4, prompt=9, new=12, micro_batch=2, device="cpu", offload=False,
                              workdir=str(tmp_path))
    gen, upd = r["generation"], r["update"]
    assert gen.seconds > 0 and upd.seconds > 0
    assert gen.peak_allocated_gib is None  # no CUDA counters on the CPU
    assert r["reward"] > 1 and math.isfinite(r["loss"])
    # the step moved every B (each A has no gradient while its B is zero: LoRA's zero start)
    assert r["adapters"] == 2 * 7 * 2 and r["adapters_changed"] == 2 * 7
    assert torch.get_default_dtype() == torch.float32  # the bf16 build put the default back
