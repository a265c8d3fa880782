"""`velotune doctor` judged on faked machines (the facts `collect` would read), and its probes
read a fake nvidia-smi and NCCL settings from the environment."""
from __future__ import annotations

import dataclasses
import os
import platform

import pytest

from velotune.cli import main
from velotune.cli import doctor as doctor_cli
from velotune.doctor import Facts, Gpu, collect, diagnose, socket_ifname_matches

H100 = Gpu("NVIDIA H100 80GB HBM3", 79.1, (9, 0), True)


def healthy(**changes) -> Facts:
    """A ready H100 machine; `changes` break one thing at a time."""
    facts = Facts(python="3.12.3", python_required=">=3.10", torch="2.11.0+cu128", torch_required=">=2.11",
                  torch_cuda="12.8", triton="3.5.0", triton_pinned="3.5.0", cuda_available=True, gpus=[H100],
                  driver="570.133.20", smi_gpus=1, output_dir="runs", disk_free_gib=500.0, host_total_gib=250.0,
                  host_available_gib=200.0, llama_cpp=["llama-cli"], nccl="2.26.2", interfaces=["eth0", "lo"])
    return dataclasses.replace(facts, **changes)


def problems(facts: Facts) -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {"fail": [], "warn": [], "note": []}
    for check in diagnose(facts):
        if check.level != "ok":
            found[check.level].append((check.what, check.fix))
    return found


def test_a_ready_machine_has_nothing_to_fix():
    assert problems(healthy()) == {"fail": [], "warn": [], "note": []}
    lines, status = doctor_cli.report(diagnose(healthy()))
    assert status == 0 and lines[-1] == "nothing blocks training."
    assert "ok    GPU 0: NVIDIA H100 80GB HBM3, 79.1 GiB, compute capability 9.0, bfloat16" in lines


@pytest.mark.parametrize("changes, what, fix", [
    (dict(driver="470.57.02"), "NVIDIA driver 470.57.02 is too old for torch's CUDA 12.8 (CUDA 12.x needs driver "
                               "525 or newer)", "update the driver to 525+"),
    (dict(torch_cuda="13.0", driver="570.133.20"), "(CUDA 13.x needs driver 580 or newer)", "update the driver to 580+"),
    (dict(triton="3.4.0"), "triton 3.4.0 is installed, but torch 2.11.0+cu128 was built for triton 3.5.0",
     "pip install triton==3.5.0"),
    (dict(triton=None), "triton is not installed, but torch", "pip install triton==3.5.0"),
    (dict(python="3.9.18"), "Python 3.9.18, velotune needs >=3.10", "uv venv"),
    (dict(torch="2.4.1+cu121"), "torch 2.4.1+cu121, velotune needs >=2.11", "pip install 'torch>=2.11'"),
    (dict(torch_cuda=None, cuda_available=False, gpus=[], triton_pinned=None, nccl=None),
     "nvidia-smi lists 1 GPU(s) but torch cannot use them (torch is a CPU build)", "download.pytorch.org/whl/cu128"),
    (dict(cuda_available=False, gpus=[], visible_devices=""),
     "nvidia-smi lists 1 GPU(s) but torch cannot use them (CUDA_VISIBLE_DEVICES='' hides them)",
     "unset or correct CUDA_VISIBLE_DEVICES"),
    (dict(gpus=[Gpu("Tesla P100-PCIE-16GB", 15.9, (6, 0), False)]),
     "the Triton kernels need compute capability 7.0 or newer", "VELOTUNE_KERNELS=0"),
    (dict(disk_free_gib=0.4), "0.4 GiB free for checkpoints under runs", "free disk space"),
    (dict(nccl_env={"NCCL_SOCKET_IFNAME": "eth9"}), "NCCL_SOCKET_IFNAME=eth9 matches none of this machine's network "
                                                    "interfaces (eth0, lo)", "unset NCCL_SOCKET_IFNAME"),
])
def test_each_blocking_problem_fails_with_its_fix(changes, what, fix):
    failures = problems(healthy(**changes))["fail"]
    assert len(failures) == 1, failures
    assert what in failures[0][0] and fix in failures[0][1], failures
    lines, status = doctor_cli.report(diagnose(healthy(**changes)))
    assert status == 1 and lines[-1] == "1 problem(s) block training."


@pytest.mark.parametrize("changes, what", [
    (dict(gpus=[Gpu("Tesla T4", 14.6, (7, 5), False)]), "no bfloat16, so training runs float16 with loss scaling"),
    (dict(gpus=[Gpu("Tesla P100-PCIE-16GB", 15.9, (6, 0), False)], kernels_enabled=False), "no bfloat16"),
    (dict(disk_free_gib=12.0), "12.0 GiB free for checkpoints under runs (a full fine-tune's checkpoint"),
    (dict(host_available_gib=40.0), "host memory 40.0 of 250.0 GiB available: too little to offload much"),
    (dict(nccl_env={"NCCL_P2P_DISABLE": "1"}), "NCCL_P2P_DISABLE=1 slows every multi-GPU step"),
    (dict(torch_cuda=None, cuda_available=False, gpus=[], smi_gpus=0, driver=None, triton_pinned=None, nccl=None),
     "no CUDA GPU: training runs on the CPU"),
    (dict(gpus=[H100, H100], nccl=None), "2 GPUs but no NCCL in this torch build"),
])
def test_what_only_slows_training_warns_and_exits_zero(changes, what):
    found = problems(healthy(**changes))
    assert found["fail"] == [] and [w for w, _ in found["warn"]] and any(what in w for w, _ in found["warn"]), found
    assert doctor_cli.report(diagnose(healthy(**changes)))[1] == 0


def test_missing_llama_cpp_is_a_note():
    [(what, fix)] = problems(healthy(llama_cpp=[]))["note"]
    assert what.startswith("llama.cpp not found") and "llama-cpp-python" in fix


@pytest.mark.parametrize("value, matches", [("eth", True), ("eth9", False), ("=eth", False), ("=eth0", True),
                                            ("^lo", True), ("^eth,lo", False), ("en,eth", True)])
def test_nccl_socket_ifname_follows_nccl_rules(value, matches):
    assert socket_ifname_matches(value, ["eth0", "lo"]) is matches


def test_collect_reads_this_machine_and_a_fake_nvidia_smi(tmp_path, monkeypatch):
    import torch

    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 535.183.01\necho 535.183.01\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    facts = collect(tmp_path / "not" / "yet")
    assert facts.python == platform.python_version() and facts.torch == torch.__version__
    assert (facts.driver, facts.smi_gpus) == ("535.183.01", 2)
    assert facts.nccl_env["NCCL_DEBUG"] == "INFO"
    assert facts.disk_free_gib is not None and facts.disk_free_gib > 0       # measured on the nearest parent
    assert facts.host_total_gib is None or facts.host_total_gib >= facts.host_available_gib


def test_the_command_prints_fixes_and_exits_one_when_blocked(monkeypatch, capsys):
    monkeypatch.setattr(doctor_cli, "collect", lambda output_dir: healthy(driver="470.57.02", llama_cpp=[]))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "FAIL  NVIDIA driver 470.57.02 is too old for torch's CUDA 12.8 (CUDA 12.x needs driver 525 or newer)" in out
    assert out[out.index("FAIL  NVIDIA driver 470.57.02 is too old for torch's CUDA 12.8 (CUDA 12.x needs driver "
                         "525 or newer)") + 1].startswith("      fix: update the driver to 525+")
    assert out[-1] == "1 problem(s) block training."
    monkeypatch.setattr(doctor_cli, "collect", lambda output_dir: healthy())
    assert main(["doctor"]) == 0
