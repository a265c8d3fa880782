"""`velotune train [CONFIG.yaml] [--key=value ...]`: fine-tune as the config says.

Without a config it runs `TrainConfig`'s own defaults (a whole epoch, no exports) with the
overrides given; `--demo` runs the bundled demo config instead (LoRA on SmolLM2-135M-Instruct with
the chatterbot dialogues, 40 steps and exports, a few minutes on a CPU: what `make demo` runs).
The demo's settings used to be the no-config default, and a user's `velotune train --model M
--dataset D --num_epochs=1` then stopped after the demo's 40 steps and tried its Ollama export.
Every YAML key can be overridden on the command line. SIGTERM stops a run after the step in
progress, once its checkpoint is written (exit status 143; train/stop.py).
`--nproc-per-node N` starts the same command on N processes of this machine through torchrun;
started by torchrun directly, every process runs this module as a rank.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import resources

from velotune.train.config import TrainConfigError, load_config

DEMO_CONFIG = "demo.yaml"
EPILOG = """\
overrides: any config key as --key=value (values are YAML: --packing=true, --target_modules=[q_proj,v_proj]).
common keys: model, dataset, dataset_format, output_dir, method (lora|qlora|full|dpo|orpo|kto|simpo|grpo),
  max_steps, num_epochs, micro_batch_size, gradient_accumulation_steps, learning_rate, lr_scheduler,
  warmup_steps, max_seq_length,
  packing, lora_r, lora_alpha, lora_dropout, target_modules, gradient_checkpointing, eval_split, eval_steps,
  save_steps, resume, seed.  See examples/*.yaml for annotated configs.

examples:
  velotune train --demo                           # the demo (what make demo runs)
  velotune train --model DIR --dataset rows.jsonl # TrainConfig's defaults: one epoch of LoRA
  velotune train run.yaml --learning_rate=1e-4 --max_steps=200
  velotune data run.yaml                          # first: the rows as training sees them, and statistics
  velotune train run.yaml --resume=true           # continue from OUTPUT_DIR/checkpoints/latest
  velotune train run.yaml --nproc-per-node 4      # 4 GPUs (DDP for LoRA/QLoRA, FSDP2 for full)
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
      -m velotune train run.yaml                  # several machines (docs/distributed.md)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a model (LoRA, QLoRA, full; DPO, ORPO, KTO, SimPO, GRPO) from a YAML config",
        usage="velotune train [-h] [--demo] [--no-progress] [--nproc-per-node N] [CONFIG.yaml] [--key=value ...]",
        description="Fine-tune a model as CONFIG.yaml says; with no config, with the defaults of every "
                    "key (see examples/*.yaml) and the --key=value overrides given.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="training config (default: every key's default)")
    p.add_argument("--demo", action="store_true",
                   help="run the bundled demo config (LoRA on SmolLM2-135M-Instruct with the chatterbot-corpus "
                        "dialogues, 40 steps, then exports); overrides still apply")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and CI)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, metavar="N", dest="nproc_per_node",
                   help="train on N processes of this machine (one per GPU) through torchrun")
    p.set_defaults(func=run, accepts_extra=True)


def demo_config_path() -> str:
    return str(resources.files("velotune.configs").joinpath(DEMO_CONFIG))


def run(args: argparse.Namespace) -> int:
    from velotune.data import DataError
    from velotune.errors import ConfigError, LoadError
    from velotune.export import ExportError
    from velotune.rl.rewards import RewardError
    from velotune.train.checkpoint import CheckpointError
    from velotune.train.guard import TrainingStopped
    from velotune.train.run import train_from_config
    from velotune.train.stop import STOPPED_EXIT_CODE, StopRequested

    from velotune import distributed
    from velotune.distributed.launch import LaunchError

    try:
        if args.demo and args.config:
            raise TrainConfigError(f"command line: --demo runs the bundled demo config; it cannot be combined "
                                   f"with {args.config}")
        config = load_config(demo_config_path() if args.demo else args.config, args.extra)
        if args.nproc_per_node is not None:
            return launch(args, config.device)
        train_from_config(config, show_progress=not args.no_progress)
    except StopRequested as exc:
        print(f"velotune train: {exc}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except (TrainConfigError, DataError, LoadError, ConfigError, CheckpointError, LaunchError, TrainingStopped,
            ExportError, RewardError) as exc:
        print(f"velotune train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("velotune train: interrupted; resume with --resume=true", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0


def relaunch_args(args: argparse.Namespace) -> list[str]:
    """This command line without --nproc-per-node: what every rank runs."""
    return ["train", *([args.config] if args.config else []), *(["--demo"] if args.demo else []),
            *(["--no-progress"] if args.no_progress else []), *args.extra]


def launch(args: argparse.Namespace, device: str) -> int:
    """Run this command on --nproc-per-node processes under torchrun; its exit status."""
    import torch

    from velotune.distributed.launch import check_launch, child_environment, torchrun_command

    command = torchrun_command(args.nproc_per_node, relaunch_args(args))
    check_launch(args.nproc_per_node, os.environ, torch.cuda.device_count(), device)
    print(f"velotune train: starting {' '.join(command)}", file=sys.stderr)
    return subprocess.run(command, env=child_environment(os.environ), check=False).returncode
