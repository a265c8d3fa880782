"""Running a job on several CPU processes joined by the gloo backend, the way torchrun would
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment), plus the tiny chat data the
trainer tests use. A job is a module-level function, so spawned processes can import it."""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import random
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
from rich.console import Console

from velotune import distributed
from velotune.train.config import TrainConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def train_job(*configs: TrainConfig) -> None:
    """`train_from_config` for each config in turn, in one process group."""
    from velotune.train.run import train_from_config

    for config in configs:
        train_from_config(config, console=quiet(), show_progress=False)


def join_as(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of `world_size` on this host, one thread each."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _rank_main(rank: int, world_size: int, port: int, job: Callable[..., None], args: tuple) -> None:
    """Run the job, leave the group, then end the process without interpreter finalization.

    Why `os._exit`: a rank once aborted in CI with "terminate called without an active
    exception" and no Python error, which is what a gloo worker thread does when it drops the last
    reference to a tensor while the interpreter is being finalized (it needs the GIL, Python ends
    the thread mid-unwind). By the time of `os._exit` the job's results are on disk and its errors
    have been raised, so skipping finalization loses nothing. faulthandler prints every thread's
    Python stack if a rank aborts anyway, so the next occurrence shows where."""
    faulthandler.enable(all_threads=True)
    join_as(rank, world_size, port)
    try:
        job(*args)
    finally:
        distributed.teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(world_size: int, job: Callable[..., None], *args) -> None:
    """Run job(*args) on `world_size` spawned processes, each joined to the group; raises if any
    rank fails."""
    mp.start_processes(_rank_main, args=(world_size, free_port(), job, args), nprocs=world_size,
                       start_method="spawn")


WORDS = "alpha beta gamma delta kilo lima mike oscar papa tango zulu echo".split()


def write_chat_data(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` short conversations (messages format) whose answers repeat the question backwards:
    learnable by a tiny model, lengths vary."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 5))]
            handle.write(json.dumps({"messages": [{"role": "user", "content": " ".join(words)},
                                                  {"role": "assistant", "content": " ".join(reversed(words))}]})
                         + "\n")
    return path


def eval_losses(output_dir: Path) -> dict[int, float]:
    from velotune.train.metrics import read_metrics

    return {r["step"]: r["eval_loss"] for r in read_metrics(output_dir) if "eval_loss" in r}
