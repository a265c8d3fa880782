"""Batched decode throughput: velotune's generation engine vs transformers' `generate`.

Both decode greedily, in this one process, from the same random-weight model (velotune loads the
weights transformers created, so both run the same numbers), batch B of random prompts of P
tokens, N new tokens each with no stop token. velotune runs twice: with its CUDA-graph decode
step (the default on a GPU) and with the same static step run eagerly (`decode="static"`), which
shows what the graphs buy. Each timed call includes prefill and, for velotune, the graph captures
(graphs belong to one call). Appends one row per system to RESULTS.md.

Same greedy ids: in bf16, random weights give near-tied logits (the top two of 128k logits of
a random head are a few hundredths apart, about one bf16 rounding step of a logit), so any change
in summation order flips some argmax and the sequences part ways; that says nothing about
correctness. The check that can fail only on a real difference runs in float32 on the same
architecture cut to a few layers, with left-padded prompts of different lengths. For the bf16
model the row records where each of two rows first differs, with transformers' top-1 minus top-2
logit at that step: a gap near bf16 resolution confirms a near tie.

    python benchmarks/bench_generate.py --model Llama-3.2-1B --batch 64 --prompt 128 --new 128
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import append_row, machine, require_cuda, today


def timed(fn) -> float:
    fn()  # warm-up (allocations, kernel selection, Triton compilation)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def model_pair(cfg: dict, dtype: torch.dtype, device: str = "cuda"):
    """A random-weight transformers model and velotune's load of the same weights."""
    import transformers

    import velotune

    rest = dict(cfg)
    hf_config = transformers.AutoConfig.for_model(rest.pop("model_type"), **rest)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(device).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours, _ = velotune.load_model(tmp, dtype=dtype, device=device)
    return ref, ours


def agreement(ref, ours, ids: torch.Tensor, mask: torch.Tensor, new: int) -> list[tuple[int, float]]:
    """Per row: generated tokens equal before the first difference (`new` if none), and
    transformers' top-1 minus top-2 logit at that step (nan if none)."""
    from velotune.infer.engine import generate_tensor
    from velotune.infer.sampling import SamplingParams

    out = ref.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       return_dict_in_generate=True, output_logits=True)
    got = generate_tensor(ours, ids, SamplingParams(max_new_tokens=new), attention_mask=mask, stop_token_ids=[])
    expected, got = out.sequences[:, ids.shape[1]:], got[:, ids.shape[1]:]
    rows = []
    for r in range(ids.shape[0]):
        differs = (expected[r] != got[r]).nonzero()
        if len(differs) == 0:
            rows.append((new, float("nan")))
            continue
        step = int(differs[0])
        top2 = out.logits[step][r].float().topk(2).values
        rows.append((step, float(top2[0] - top2[1])))
    return rows


def float32_check(cfg: dict, layers: int, new: int, device: str = "cuda") -> str:
    """Same greedy ids in float32 on the architecture cut to `layers` layers, 4 left-padded rows."""
    ref, ours = model_pair(dict(cfg, num_hidden_layers=layers), torch.float32, device)
    lengths = [32, 20, 7, 26]
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, -n:] = torch.randint(1, cfg["vocab_size"], (n,), generator=g)
        mask[r, -n:] = 1
    rows = agreement(ref, ours, ids.to(device), mask.to(device), new)
    same = all(k == new for k, _ in rows)
    detail = "" if same else " (first difference per row: " + ", ".join(f"{k} gap {gap:.2g}" for k, gap in rows) + ")"
    return f"float32 {layers}-layer, 4 left-padded rows x {new}: {same}{detail}"


def main() -> None:
    require_cuda()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.2-1B")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--check-layers", type=int, default=4, help="layers of the float32 same-ids check")
    args = p.parse_args()
    from velotune.infer.engine import generate_tensor
    from velotune.infer.sampling import SamplingParams
    from velotune.models.known_configs import known_config

    cfg = dict(known_config(args.model)[1]["config"])
    f32 = float32_check(cfg, args.check_layers, 32)
    print(f32, flush=True)
    ref, ours = model_pair(cfg, torch.bfloat16)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.prompt), device="cuda")
    mask = torch.ones_like(ids)
    times = {"transformers generate": timed(lambda: ref.generate(
        ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False))}
    for name, decode in (("velotune engine, CUDA graphs", "graph"), ("velotune engine, eager static step", "static")):
        params = SamplingParams(max_new_tokens=args.new, stop_token_ids=[], decode=decode)
        times[name] = timed(lambda: generate_tensor(ours, ids, params, attention_mask=mask, stop_token_ids=[]))
    bf16 = agreement(ref, ours, ids[:2], mask[:2], 16)
    same = f"{f32}; bf16 2 x 16: " + ", ".join(
        "all 16 equal" if k == 16 else f"equal for {k}, top-2 gap there {gap:.3f}" for k, gap in bf16)
    tokens = args.batch * args.new
    config = f"{args.model} bf16 greedy, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens"
    cols = ["date", "machine", "config", "system", "generated tokens/s", "s per batch", "ratio", "same greedy ids"]
    t_ref = times["transformers generate"]
    for name, t in times.items():
        row = [today(), machine(), config, name, f"{tokens / t:,.0f}", f"{t:.2f}", f"{t_ref / t:.2f}x", same]
        append_row("Batched decode throughput", cols, row)
        print(" | ".join(row[2:7]), flush=True)
    print(same, flush=True)


if __name__ == "__main__":
    main()
