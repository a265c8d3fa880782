"""Longest GRPO completion that trains, velotune against Unsloth in the same call (issue 25): the
Qwen3-8B architecture (random weights), QLoRA r16, one prompt, a group of 8 completions of exactly N
tokens, one optimizer step per trial.

    python benchmarks/bench_grpo_longest.py                       # both systems, ~560 s, one device call
    python benchmarks/bench_grpo_longest.py --systems velotune --start 16384 --budget-s 560

Each system's search: N doubles from --start while the step trains; after the first failure it
bisects between the longest N that trained and the shortest that failed, down to --grain tokens.
Every trial is its own process (grpo_peer.py, through common.run_peer), so an out-of-memory error
cannot leave the next trial a fragmented allocator. Only a memory failure (GPU or host out of
memory) bounds the search from above; any other error ends that system's search, as does the time:
the call's --budget-s is shared, Unsloth's search gets half of what is left after its folder is
written and velotune the rest; a trial that the last one to train predicts to outlast the share is
not started (its time goes to the next system), and one that outlives it is recorded as timed out
(so a row can say "at least N" rather than the limit). Time grows faster than N (8 completions
decoded one token at a time with a KV cache that grows, then 8 forward+backward passes of P+N
tokens), so --start lets a later call begin where an earlier one was stopped by the time.

The set-ups (grpo_peer.py's docstring says each in full, and what is assumed of Unsloth):
velotune's trainer with method grpo, its memory defaults for this step (checkpointing on, layer
inputs offloaded to host memory), the model built on the GPU; Unsloth's GRPO notebook set-up
(FastLanguageModel 4-bit, use_gradient_checkpointing="unsloth", TRL's GRPOTrainer, adamw_8bit),
with fast_inference=False because vLLM is not on the device, reading a random-weight folder
written once (common.write_folder, SmolLM2's tokenizer from .bench/tokenizer). Both update
--micro-batch completions per forward/backward (default 1) and sample the whole group at once.
One row per system goes to RESULTS.md: the longest N that trained (its seconds and peak GiB), the
first N that failed and why, how the search ended, every trial, and velotune/Unsloth, written as a
bound (">=", "<=") where one search was stopped by the time before its memory limit.

What one call can reach (not yet measured): decoding is one token per step for the whole group, so
a trial costs about N decode steps plus loading. The only velotune figure so far (RESULTS.md, GRPO
memory, Llama-3.1-8B QLoRA, 8 x 512) is 18.3 s of generation, ~36 ms a step; at that rate N=8,192
takes ~5 minutes and N=16,384 more than one call's 600 s, while the memory limits lie further out
(the group's KV cache alone, 36 layers x 2 x 8 heads x 128 x 2 B = 144 KiB a token for Qwen3-8B,
is 8 x 144 KiB x N: 72 GiB at N=65,536). Rows of one call therefore bound the ratio rather than
measure it unless a system runs out of memory within the call's time.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = HERE / "grpo_peer.py"
TOKENIZER = HERE.parent / ".bench" / "tokenizer"      # SmolLM2's, from `bench_e2e.py prepare`
MODEL = "Qwen3-8B"
SYSTEMS = ("unsloth", "velotune")
SECTION = "Longest GRPO completion vs Unsloth (QLoRA r16, 8 completions, one step, same call)"
COLUMNS = ["date", "machine", "config", "system", "longest N trained", "its s / peak GiB", "first N failed",
           "search ended", "trials", "velotune / Unsloth"]


@dataclass
class Search:
    """One system's trials, in the order run, and why the search ended."""

    system: str
    trials: list[dict] = field(default_factory=list)
    ended: str = ""

    def longest_ok(self) -> dict | None:
        ok = [t for t in self.trials if t["outcome"] == "ok"]
        return max(ok, key=lambda t: t["new"]) if ok else None

    def limit_found(self) -> bool:
        """Whether the search closed in on a memory limit (not stopped by the time or an error)."""
        return self.ended.startswith(("limit within", "N=")) and "not started" not in self.ended

    def first_failed(self) -> dict | None:
        failed = [t for t in self.trials if memory_failure(t["outcome"])]
        return min(failed, key=lambda t: t["new"]) if failed else None


def memory_failure(outcome: str) -> bool:
    """A failure that says this length does not fit (GPU or host memory), not a broken set-up or the clock."""
    return "OOM" in outcome or "out of memory" in outcome.lower()


def search(system: str, trial: Callable[[int, float], dict], start: int, grain: int, deadline: float,
           clock: Callable[[], float] = time.monotonic) -> Search:
    """Double N from `start` while `trial(N, seconds left)` trains; then bisect between the longest that
    trained and the shortest that ran out of memory until they are `grain` apart. Ends early at a
    trial that was skipped or timed out (the time is spent) or failed otherwise (not a memory limit),
    and before a trial the last one that trained predicts to outlast the time left (its wall seconds
    scaled by the lengths: a lower bound, decoding grows faster than N), leaving that time to the
    next system."""
    if start % grain:
        raise ValueError(f"--start {start} must be a multiple of --grain {grain}")
    found = Search(system)
    lo, hi, n = 0, None, start
    while True:
        left = deadline - clock()
        best = found.longest_ok()
        if best is not None and best.get("wall_s") and best["wall_s"] * n / best["new"] > left:
            found.ended = (f"N={n:,} not started: predicted over {best['wall_s'] * n / best['new']:.0f} s, "
                           f"{left:.0f} s left")
            return found
        r = trial(n, left)
        found.trials.append({**r, "new": n})
        if r["outcome"] == "ok":
            lo = n
        elif memory_failure(r["outcome"]):
            hi = n
        else:
            found.ended = f"{r['outcome']} at N={n:,}"
            return found
        if hi is None:
            n = 2 * lo
            continue
        if hi - lo <= grain:
            found.ended = (f"limit within {grain}" if lo else f"N={hi:,} does not fit and {grain} is the grain")
            return found
        n = lo + (hi - lo) // 2 // grain * grain


def peer_command(system: str, new: int, args: argparse.Namespace, folder: Path | None) -> list[str]:
    command = [sys.executable, str(PEER), f"--system={system}", f"--new={new}", f"--group={args.group}",
               f"--prompt={args.prompt}", f"--micro-batch={args.micro_batch}", f"--device={args.device}"]
    if system == "unsloth":
        return command + [f"--model={folder}"]
    return command + [f"--generation-batch={args.generation_batch}", f"--config={args.config}"]


def run_trial(system: str, args: argparse.Namespace, folder: Path | None) -> Callable[[int, float], dict]:
    from common import run_peer

    def trial(new: int, seconds_left: float) -> dict:
        started = time.monotonic()
        r = run_peer(peer_command(system, new, args, folder), "GRPO", system, seconds_left)
        r["wall_s"] = time.monotonic() - started   # the process's whole life: imports and loading included
        print(f"  {system:8s} N={new:7,}  {r.get('seconds', 0):6.1f} s  peak {r.get('peak_gib') or 0:5.1f} GiB  "
              f"{r['outcome'][:160]}", flush=True)
        return r
    return trial


def ratio_text(ratio: float, ours_found: bool, theirs_found: bool) -> str:
    """The ratio of longest lengths, as a bound where a search was stopped before its memory limit."""
    if ours_found and theirs_found:
        return f"{ratio:.2f}x"
    if ours_found:
        return f"<= {ratio:.2f}x (Unsloth's limit not reached)"
    if theirs_found:
        return f">= {ratio:.2f}x (velotune's limit not reached)"
    return f"{ratio:.2f}x (neither limit reached)"


def trial_text(t: dict) -> str:
    said = "ok" if t["outcome"] == "ok" else t["outcome"].split(" (")[0].split(":")[0]
    return f"{t['new']:,} {said}" + (f" {t['seconds']:.0f} s" if t.get("seconds") else "")


def rows(searches: dict[str, Search], config: str, day: str, where: str) -> list[list[str]]:
    """One row per system; velotune's longest N over Unsloth's on velotune's row where both trained one."""
    longest = {s: found.longest_ok() for s, found in searches.items()}
    out = []
    for system, found in searches.items():
        best, failed = longest[system], found.first_failed()
        version = next((t["version"] for t in found.trials if t.get("version")), system)
        ratio = "-"
        if system == "velotune":
            ours, theirs = longest.get("velotune"), longest.get("unsloth")
            ratio = "n/a"
            if ours and theirs and "unsloth" in searches:
                ratio = ratio_text(ours["new"] / theirs["new"], found.limit_found(), searches["unsloth"].limit_found())
        peak = "-" if not best or best.get("peak_gib") is None else f"{best['peak_gib']:.1f}"
        out.append([day, where, config, version, f"{best['new']:,}" if best else "none",
                    f"{best['seconds']:.0f} / {peak}" if best else "-",
                    f"{failed['new']:,}: {failed['outcome'][:120]}" if failed else "none", found.ended,
                    "; ".join(trial_text(t) for t in found.trials), ratio])
    return out


def unsloth_folder(args: argparse.Namespace) -> Path:
    from common import bf16_bytes, choose_workdir, folder_for, write_folder
    from grpo_peer import velotune_config

    tokenizer = Path(args.tokenizer)
    if not (tokenizer / "tokenizer.json").exists():
        raise SystemExit(f"Unsloth loads a tokenizer with the model: {tokenizer} has no tokenizer.json "
                         "(run `python benchmarks/bench_e2e.py prepare` here and carry .bench)")
    cfg = velotune_config(args.config)
    return write_folder(cfg, folder_for(cfg, choose_workdir(args.workdir, bf16_bytes(cfg), "velotune-grpo")),
                        tokenizer, args.device)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--config", default=MODEL, help="a bundled config name or a config.json path")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--micro-batch", type=int, default=1, help="completions per forward/backward in the update")
    p.add_argument("--generation-batch", type=int, default=0,
                   help="velotune only: completions decoded at once (0, its default: the whole group, as TRL does)")
    p.add_argument("--start", type=int, default=1024, help="the first N tried")
    p.add_argument("--grain", type=int, default=512, help="bisection stops when the limit is this close")
    p.add_argument("--budget-s", type=float, default=560, help="the whole call, folder included")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: velotune only (smoke run)")
    p.add_argument("--workdir", default="auto", help="where Unsloth's random folder goes (auto: /dev/shm if room)")
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="tokenizer files copied into Unsloth's folder")
    p.add_argument("--results", default=None, help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    p.add_argument("--no-record", action="store_true", help="print the rows only")
    return p


def main(argv: list[str] | None = None) -> dict[str, Search]:
    from common import append_row, machine, today

    args = parser().parse_args(argv)
    if args.device == "cpu" and "unsloth" in args.systems:
        raise SystemExit("Unsloth runs only on a CUDA GPU: give --systems velotune with --device cpu")
    if args.group % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide --group {args.group}")
    deadline = time.monotonic() + args.budget_s
    where = machine()
    print(where, flush=True)
    folder = unsloth_folder(args) if "unsloth" in args.systems else None
    searches = {}
    for i, system in enumerate(args.systems):
        share = (deadline - time.monotonic()) / (len(args.systems) - i)
        searches[system] = search(system, run_trial(system, args, folder), args.start, args.grain,
                                  time.monotonic() + share)
        best = searches[system].longest_ok()
        print(f"{system}: longest N trained {best['new'] if best else 'none'}, ended: {searches[system].ended}",
              flush=True)
    config = (f"{Path(args.config).stem} arch, random weights, QLoRA NF4 r16, 1 prompt of {args.prompt} tokens, "
              f"{args.group} completions, update micro-batch {args.micro_batch}"
              + (f", velotune decodes {args.generation_batch} at a time" if args.generation_batch else "")
              + f", {args.device}")
    for row in rows(searches, config, today(), where):
        print(" | ".join(row[3:]), flush=True)
        if not args.no_record:
            append_row(SECTION, COLUMNS, row, Path(args.results) if args.results else None)
    return searches


if __name__ == "__main__":
    main()
