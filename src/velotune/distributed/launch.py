"""`velotune train CONFIG --nproc-per-node N`: start the same command under torchrun.

The launcher is PyTorch's own (`python -m torch.distributed.run`, what the `torchrun` script
runs), on one machine (`--standalone`: a local rendezvous on a free port). Several machines use
torchrun directly with a rendezvous endpoint (docs/distributed.md).
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

# Our shared GPU hosts hand out GPUs of one machine to different jobs; NVLink SHARP (NVLS)
# multicast objects span GPUs another job may hold, and creating them fails or hangs there. NCCL
# (NVLS) and torch's symmetric memory are told not to use multicast; a user's own setting wins.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


class LaunchError(ValueError):
    """A --nproc-per-node request that cannot be started; the message says why."""


def torchrun_command(nproc_per_node: int, velotune_args: Sequence[str], python: str = sys.executable) -> list[str]:
    """The command that runs `velotune ARGS` on `nproc_per_node` processes of this machine."""
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node must be a whole number of at least 1, got {nproc_per_node!r}")
    if any(arg.startswith("--nproc") for arg in velotune_args):
        raise LaunchError("the command given to torchrun must not ask for --nproc-per-node again")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "velotune", *velotune_args]


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with multicast turned off unless the user chose otherwise."""
    env = dict(environ)
    for name, value in MULTICAST_OFF.items():
        env.setdefault(name, value)
    return env


def check_launch(nproc_per_node: int, environ: Mapping[str, str], gpus: int, device: str) -> None:
    """Refuse what would fail later in N processes at once: a launch from inside torchrun, or
    more processes than GPUs when the run is to use GPUs."""
    if "TORCHELASTIC_RUN_ID" in environ or int(environ.get("WORLD_SIZE", "1")) > 1:
        raise LaunchError("--nproc-per-node given inside a torchrun job; torchrun already started the processes")
    if device != "cpu" and gpus and nproc_per_node > gpus:
        raise LaunchError(f"--nproc-per-node {nproc_per_node} asks for more processes than the {gpus} GPUs here "
                          "(one process per GPU)")
