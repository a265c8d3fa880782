"""One training run from a `TrainConfig`, start to finish: what `velotune train` does, for every
method (the registry is train/methods.py; all of them train in the one `Trainer` loop).

Load the model and data, adapt the model for the method, measure the method's eval metrics (and
answer a few held-out prompts) before training, train, measure again, save the adapter or model,
write the report and the exports, and print where everything went. A resumed run skips the "before" measurements (the
model is already part-trained) and takes them from the interrupted run's metrics when present.

Under torchrun every rank runs this function: each loads the model and data, the Trainer wraps
the model and shares the rows, and only rank 0 prints, writes config/adapter/model/report/exports
(a FSDP-trained model is first gathered whole onto rank 0). An FSDP run loads the model on the
CPU, so a model too large for one GPU reaches the GPUs only as shards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from velotune import distributed
from velotune.data.mixing import describe
from velotune.distributed import World
from velotune.errors import LoadError
from velotune.loaders import load_model
from velotune.rl.rewards import resolve
from velotune.train import methods
from velotune.train.config import TrainConfig, TrainConfigError, check_values
from velotune.train.data import TrainData, source_lines
from velotune.train.metrics import peak_memory_gib, read_metrics
from velotune.train.report import RunSummary, write_report
from velotune.train.run_folder import prepare_run_folder
from velotune.train.samples import answer, sample_prompts, write_samples
from velotune.train.tensorboard import TensorBoardLog
from velotune.train.trainer import Trainer, TrainResult


@dataclass
class RunResult:
    output: Path                                # the adapter or model folder
    train: TrainResult
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    eval_before: dict[str, float] = field(default_factory=dict)   # every eval metric at step 0
    eval_after: dict[str, float] = field(default_factory=dict)    # ... and at the last step
    report: Path | None = None
    samples: list[tuple[str, str, str]] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)


def pick_device(name: str, world: World = World()) -> torch.device:
    """The run's device; under torchrun each rank's GPU is cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainConfigError(f"key 'device' is {name!r}, but no CUDA GPU is available (use auto or cpu)")
    if world.distributed and name.startswith("cuda"):
        if name != "cuda":
            raise TrainConfigError(f"key 'device' is {name!r}, but under torchrun each rank uses "
                                   "cuda:LOCAL_RANK: set device to auto or cuda")
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def join_world(config: TrainConfig) -> World:
    """The torchrun process group (gloo for device: cpu or without GPUs, else nccl); World()
    in a plain process."""
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    return distributed.setup("gloo" if cpu else "nccl")


def pad_id_of(tokenizer, model) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      model.config.pad_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def train_from_config(config: TrainConfig, *, console: Console | None = None, show_progress: bool = True) -> RunResult:
    check_values(config, "config")
    world = join_world(config)
    console = console or Console()
    say = console.print if world.is_main else _silent
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = pick_device(config.device, world)
    out = Path(config.output_dir)
    resume_from = prepare_run_folder(config, world, say)     # refuses to mix runs; writes config.yaml
    strategy = distributed.resolve_strategy(config.distributed, config.uses_lora, world)

    say(f"[bold]velotune train[/bold]: {config.method} on {config.model or 'SmolLM2-135M-Instruct (default)'}, "
        f"device {device}" + (f", {world.world_size} ranks ({strategy})" if world.distributed else ""))
    objective_rewards = [resolve(spec) for spec in config.rewards]  # a bad reward name fails before loading
    rows = methods.read_data(config)                     # so does bad data: files, templates, transforms
    load_device = torch.device("cpu") if strategy == "fsdp" else device   # FSDP moves shards, not the model
    model, tokenizer = load_model(config.model, dtype=methods.load_dtype(config, device), device=load_device,
                                  max_seq_length=config.max_seq_length, **methods.load_options(config))
    if getattr(model, "quant_report", None) is not None:
        say(f"4-bit base: {model.quant_report.summary()}")
    if tokenizer is None:
        raise LoadError(f"{config.model}: no tokenizer found next to the model (tokenizer.json); "
                        "training data cannot be tokenized")
    data = methods.load_data(config, tokenizer, rows)
    if isinstance(data, TrainData):
        say(f"data: {describe(config.dataset)}: train {data.train_report.summary()}", markup=False)
        if data.eval_report is not None:
            say(f"      eval  {data.eval_report.summary()}", markup=False)
        for line in source_lines(data):
            say(f"      {line}", markup=False, soft_wrap=True)       # file paths stay searchable in logs
        for warning in data.train_report.warnings():
            say(f"warning: {warning}", style="yellow", markup=False)
    else:
        say(f"data: {data.summary(describe(config.dataset), config.method)}", markup=False)
    torch.manual_seed(config.seed)                       # adapter init does not depend on data loading
    methods.prepare(model, config, tokenizer)
    calibration = [e.input_ids for e in data.train] if isinstance(data, TrainData) else []
    if initialised := methods.init_adapters(model, config, calibration, fresh=resume_from is None):
        say(initialised)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    prompts = sample_prompts(data.eval_samples, tokenizer, config.sample_prompts) if world.is_main else []
    before_answers: list[str] = []
    if resume_from is None:                  # answered before wrapping: rank 0 alone, unsharded model
        before_answers = answer(model, tokenizer, prompts)
    pad_id = pad_id_of(tokenizer, model)
    objective = methods.build_objective(config, pad_id=pad_id, tokenizer=tokenizer, rewards=objective_rewards)
    trainer = Trainer(model, config, data.train, data.eval, pad_id=pad_id, objective=objective, console=console,
                      show_progress=show_progress and world.is_main, world=world, device=device,
                      save_extra=_adapter_saver(model, tokenizer, config))
    result = RunResult(output=out, train=TrainResult())
    if resume_from is not None:
        trainer.resume_from(resume_from)
        say(f"resumed from {resume_from} (step {trainer.state.step} of {trainer.total_steps})")
    elif config.resume is True:
        say(f"no checkpoint in {out / 'checkpoints'} yet: starting from step 0")
    say(f"training {trainer.total_steps} steps: {len(data.train)} examples, micro-batch {config.micro_batch_size} "
        f"x {config.gradient_accumulation_steps} accumulation, max_seq_length {config.max_seq_length}"
        f"{', packed' if config.packing else ''}")
    result.train = trainer.train()
    trained = distributed.gather_plain_model(model, world) if strategy == "fsdp" else model
    if not world.is_main:                    # rank 0 alone writes results; the others wait for it
        distributed.barrier(world)
        result.output = out / (methods.ADAPTER_DIR if config.uses_lora else methods.MODEL_DIR)
        return result
    try:
        finish(result, trained, tokenizer, config, trainer, data, prompts, before_answers, console, device,
               (trainable, total))
    finally:
        distributed.barrier(world)
    say(f"done in {time.perf_counter() - started:.0f} s")
    return result


def _silent(*args, **kwargs) -> None:
    """`say` on ranks other than 0."""


def finish(result: RunResult, model, tokenizer, config: TrainConfig, trainer: Trainer, data: Any,
           prompts, before_answers: list[str], console: Console, device: torch.device,
           parameters: tuple[int, int]) -> None:
    """Rank 0 after training: answers, the adapter or model, the report, exports."""
    say = console.print
    out = Path(config.output_dir)
    trainable, total = parameters
    evals = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval_")}
             for r in read_metrics(out) if any(k.startswith("eval_") for k in r)}
    result.eval_before, result.eval_after = evals.get(0, {}), evals.get(trainer.state.step, {})
    result.eval_loss_before = result.eval_before.get("eval_loss")
    result.eval_loss_after = result.eval_after.get("eval_loss")
    after_answers = answer(model, tokenizer, prompts)
    result.output = methods.save_result(model, tokenizer, config)
    if before_answers:
        result.samples = [(p.prompt, b, a) for p, b, a in zip(prompts, before_answers, after_answers)]
    if prompts:
        write_samples(out, [p.prompt for p in prompts], before_answers, after_answers)
    if result.samples and "tensorboard" in config.report_to:
        board = TensorBoardLog(out)
        board.samples(result.samples, trainer.state.step)
        board.close()
    print_outcome(console, result, prompts, after_answers)
    if config.report:
        summary = RunSummary(
            model=config.model or "SmolLM2-135M-Instruct", method=config.method, dataset=describe(config.dataset),
            steps=result.train.steps, train_examples=len(data.train), eval_examples=len(data.eval),
            trainable_parameters=trainable, total_parameters=total, train_seconds=trainer.state.elapsed_s,
            tokens_per_s=result.train.tokens_per_s, peak_memory_gib=peak_memory_gib(device), device=str(device),
            eval_loss_before=result.eval_loss_before, eval_loss_after=result.eval_loss_after,
            eval_metrics={k[len("eval_"):]: (result.eval_before.get(k), v) for k, v in result.eval_after.items()
                          if k != "eval_loss"},
            saved={"adapter" if config.uses_lora else "model": str(result.output)}, samples=result.samples)
        result.report = write_report(out, summary, read_metrics(out))
        say(f"report: {result.report}")
    if config.export:
        from velotune.export import calibrates
        from velotune.train.export_calibration import calibration_tokens, rows_calibration

        rows = [e.input_ids for e in data.train] if isinstance(data, TrainData) else []
        for entry in config.export:
            to, _, quant = entry.partition(":")
            calibration = rows_calibration(rows, calibration_tokens(to)) if calibrates(to, quant or None) else None
            result.exports.append(export_result(model, tokenizer, out, entry, say, calibration))


def export_result(model, tokenizer, out: Path, entry: str, say, calibration=None) -> Path:
    """Export the trained model (adapters merged on the fly, the live model untouched) and say how
    to run what was written. `calibration`: the run's training rows, for calibrated exports."""
    from velotune.export import export

    to, _, quant = entry.partition(":")
    target = out / (f"export-{to}-{quant}" if quant else f"export-{to}")
    if to == "gguf":
        target = target / "model.gguf"
    path = export(model, to=to, quant=quant or None, out=target, tokenizer=tokenizer, calibration=calibration)
    say(f"exported {entry}: {path}")
    if to in ("hf", "awq", "gptq"):
        say(f"  transformers: AutoModelForCausalLM.from_pretrained('{path}')")
        if to != "hf":
            say(f"  vLLM: vllm serve {path}")
    elif to == "gguf":
        say(f"  llama.cpp: llama-cli -m {path} -cnv")
    else:
        say(f"  Ollama: ollama create velotune-demo -f {path} && ollama run velotune-demo")
        say(f"  llama.cpp: llama-cli -m {path.parent / 'model.gguf'} -cnv")
    return path


def _adapter_saver(model, tokenizer, config: TrainConfig):
    """Checkpoints of LoRA runs carry a ready-to-use PEFT adapter folder."""
    if not config.uses_lora:
        return None
    return lambda folder: methods.save_result(model, tokenizer, config, folder / methods.ADAPTER_DIR)


def print_outcome(console: Console, result: RunResult, prompts, after_answers: list[str]) -> None:
    r = result
    for key, after in r.eval_after.items():
        name, before = key[len("eval_"):].replace("_", " "), r.eval_before.get(key)
        if before is not None:
            change = f" ({100 * (after - before) / abs(before):+.1f}%)" if before else ""
            console.print(f"[bold]eval {name}: {before:.4f} -> {after:.4f}{change}[/bold]")
        else:
            console.print(f"[bold]eval {name}: {after:.4f}[/bold]")
    if prompts:
        table = Table(title="held-out prompts", show_lines=True)
        for column in ("prompt", "dataset answer", *(("before",) if r.samples else ()), "after"):
            table.add_column(column, overflow="fold")
        for i, prompt in enumerate(prompts):
            before = (r.samples[i][1],) if r.samples else ()
            table.add_row(prompt.prompt, prompt.reference, *before, after_answers[i])
        console.print(table)
    console.print(f"saved: {r.output}  ({r.train.tokens_per_s:,.0f} tokens/s, {r.train.train_seconds:.0f} s training)")

