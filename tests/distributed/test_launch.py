"""`velotune train CONFIG --nproc-per-node N` and its errors: the torchrun command it builds, the
environment its ranks get, and one real 2-process run on the CPU through `python -m velotune`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tests.cli.cli_helpers import make_chat_model, write_config
from tests.distributed.gloo_helpers import write_chat_data

from velotune.cli import main
from velotune.distributed.launch import LaunchError, check_launch, child_environment, torchrun_command
from velotune.train.config import TrainConfigError, load_config


def test_torchrun_command_reruns_velotune_without_the_flag():
    command = torchrun_command(4, ["train", "run.yaml", "--max_steps=3"], python="/py")
    assert command == ["/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                       "-m", "velotune", "train", "run.yaml", "--max_steps=3"]


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_torchrun_command_refuses_a_bad_process_count(bad):
    with pytest.raises(LaunchError, match="--nproc-per-node must be a whole number of at least 1"):
        torchrun_command(bad, ["train"])


def test_child_environment_turns_multicast_off_unless_the_user_chose():
    env = child_environment({"PATH": "/bin", "NCCL_NVLS_ENABLE": "1"})
    assert env == {"PATH": "/bin", "NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    assert child_environment({})["NCCL_NVLS_ENABLE"] == "0"


def test_check_launch_refuses_nesting_and_more_processes_than_gpus():
    with pytest.raises(LaunchError, match="inside a torchrun job"):
        check_launch(2, {"WORLD_SIZE": "2"}, gpus=8, device="auto")
    with pytest.raises(LaunchError, match="more processes than the 2 GPUs"):
        check_launch(4, {}, gpus=2, device="auto")
    check_launch(4, {}, gpus=2, device="cpu")           # CPU ranks (gloo) are not bounded by GPUs
    check_launch(2, {}, gpus=0, device="auto")


def test_cli_reports_a_zero_process_count(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"))
    assert main(["train", str(config), "--nproc-per-node", "0"]) == 2
    err = capsys.readouterr().err
    assert "velotune train: error: --nproc-per-node must be a whole number of at least 1, got 0" in err


@pytest.mark.parametrize(("values", "message"), [
    (["--method=lora", "--distributed=fsdp"], "key 'distributed' fsdp shards full fine-tuning; method lora"),
    (["--method=qlora", "--fsdp_cpu_offload=true"], "key 'fsdp_cpu_offload' does not apply to method qlora"),
    (["--method=full", "--distributed=ddp", "--fsdp_cpu_offload=true"], "key 'fsdp_cpu_offload' needs FSDP"),
    (["--distributed=zero3"], "key 'distributed' must be one of auto, ddp, fsdp"),
    (["--method=full", "--optimizer=galore", "--distributed=fsdp"], "galore needs whole weight matrices"),
])
def test_bad_distributed_settings_name_the_key(values, message):
    with pytest.raises(TrainConfigError, match=message) as info:
        load_config(None, values)
    assert "command line --" in str(info.value)


def test_nproc_per_node_two_runs_two_cpu_ranks_end_to_end(tmp_path):
    model = make_chat_model(tmp_path / "model")
    data = write_chat_data(tmp_path / "data.jsonl", 24)
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", model=str(model), dataset=str(data), dataset_format="messages",
                          eval_split=0.0, output_dir=str(out), max_steps=2, micro_batch_size=2,
                          max_seq_length=96, device="cpu", report=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "velotune", "train", str(config), "--no-progress",
                           "--nproc-per-node", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--nproc-per-node=2 -m velotune train" in done.stderr
    assert "2 ranks (ddp)" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
