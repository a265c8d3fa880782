"""`velotune doctor`: is this machine ready to train, and if not, what to do about it.

Two halves, so the judgement can be tested on machines we do not have:
- `collect(output_dir)` reads the facts of this machine into a `Facts` (versions of Python, torch,
  Triton and their requirements from the installed packages' metadata, the driver and GPUs from
  torch and `nvidia-smi`, free disk where checkpoints go, host memory from /proc/meminfo,
  llama.cpp on the PATH, NCCL's version and NCCL_* settings, network interfaces). Each probe that
  fails leaves its fact empty instead of failing the doctor.
- `diagnose(facts)` turns them into `Check`s: ok, note (something optional is missing), warn
  (training works, worse) or fail (training cannot start or will break), each problem with a
  fix. `velotune doctor` exits 1 when any check fails.

Facts, not guesses: the Triton a torch build needs is the pin in torch's own requirements (CUDA
wheels pin it; CPU wheels do not), and the driver a CUDA runtime needs is NVIDIA's minor-version
compatibility table (`MIN_DRIVER`), the one fact we carry.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# NVIDIA's minimum Linux driver (major) for each CUDA major under minor-version compatibility
# (docs.nvidia.com/deploy/cuda-compatibility: 11.x >= 450, 12.x >= 525, 13.x >= 580).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
DISK_FAIL_GIB, DISK_WARN_GIB = 1.0, 20.0     # an adapter checkpoint is MBs; an 8B full one ~100 GB
HOST_WARN_GIB = 8.0                          # offloaded checkpoints or embeddings live in host memory
LLAMA_CPP_TOOLS = ("llama-cli", "llama-server", "llama-quantize")
SLOW_NCCL = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE")


@dataclass
class Gpu:
    name: str
    memory_gib: float
    capability: tuple[int, int]
    bf16: bool


@dataclass
class Facts:
    python: str
    python_required: str | None = None       # velotune's Requires-Python, e.g. ">=3.10"
    torch: str | None = None
    torch_required: str | None = None        # from velotune's requirements, e.g. ">=2.11"
    torch_cuda: str | None = None            # the CUDA runtime torch was built with; None = CPU build
    triton: str | None = None
    triton_pinned: str | None = None         # the Triton torch's requirements name, e.g. "3.5.0"
    kernels_enabled: bool = True             # VELOTUNE_KERNELS is not 0
    cuda_available: bool = False
    gpus: list[Gpu] = field(default_factory=list)
    driver: str | None = None                # e.g. "550.54.15"
    smi_gpus: int = 0                        # GPUs nvidia-smi lists (whether or not torch sees them)
    visible_devices: str | None = None       # CUDA_VISIBLE_DEVICES
    output_dir: str = "runs"
    disk_free_gib: float | None = None
    host_total_gib: float | None = None
    host_available_gib: float | None = None
    llama_cpp: list[str] = field(default_factory=list)   # tools on the PATH, and the Python binding
    nccl: str | None = None
    nccl_env: dict[str, str] = field(default_factory=dict)
    interfaces: list[str] = field(default_factory=list)


@dataclass
class Check:
    level: str                   # ok | note | warn | fail
    what: str
    fix: str = ""


# --- facts ------------------------------------------------------------------------------------

def collect(output_dir: str | Path = "runs") -> Facts:
    """The facts of this machine (see the module docstring)."""
    from velotune.kernels.dispatch import kernels_enabled

    facts = Facts(python=platform.python_version(), output_dir=str(output_dir), kernels_enabled=kernels_enabled(),
                  visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                  nccl_env={k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")})
    facts.python_required, facts.torch_required = _our_requirements()
    facts.triton = _installed("triton")
    facts.triton_pinned = _pinned("torch", "triton")
    _torch_facts(facts)
    facts.driver, facts.smi_gpus = _nvidia_smi()
    facts.disk_free_gib = _free_disk(Path(output_dir))
    facts.host_total_gib, facts.host_available_gib = _host_memory()
    facts.llama_cpp = [tool for tool in LLAMA_CPP_TOOLS if shutil.which(tool)]
    if importlib.util.find_spec("llama_cpp") is not None:
        facts.llama_cpp.append("llama_cpp (Python)")
    net = Path("/sys/class/net")
    facts.interfaces = sorted(p.name for p in net.iterdir()) if net.is_dir() else []
    return facts


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirements(package: str) -> list[str]:
    try:
        return importlib.metadata.requires(package) or []
    except importlib.metadata.PackageNotFoundError:
        return []


def _pinned(package: str, dependency: str) -> str | None:
    """The exact version `package` requires of `dependency` on this platform ("==X"), if any."""
    for requirement in _requirements(package):
        found = re.match(rf"{dependency}\s*==\s*([\w.+]+)", requirement)
        if found and ("platform_system" not in requirement or platform.system() in requirement):
            return found.group(1)
    return None


def _our_requirements() -> tuple[str | None, str | None]:
    try:
        python = importlib.metadata.metadata("velotune").get("Requires-Python")
    except importlib.metadata.PackageNotFoundError:
        return None, None
    torch = next((m.group(1) for r in _requirements("velotune") if (m := re.match(r"torch\s*(>=[\w.]+)", r))), None)
    return python, torch


def _torch_facts(facts: Facts) -> None:
    try:
        import torch
    except ImportError:
        return
    facts.torch, facts.torch_cuda = torch.__version__, torch.version.cuda
    facts.cuda_available = torch.cuda.is_available()
    for index in range(torch.cuda.device_count() if facts.cuda_available else 0):
        props = torch.cuda.get_device_properties(index)
        facts.gpus.append(Gpu(props.name, props.total_memory / 2**30, (props.major, props.minor), props.major >= 8))
    if facts.torch_cuda is not None:
        try:
            version = torch.cuda.nccl.version()
            facts.nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:    # no NCCL in this build, or it fails to load: a fact left empty
            facts.nccl = None


def _nvidia_smi() -> tuple[str | None, int]:
    """(driver version, number of GPUs) from nvidia-smi; (None, 0) without it."""
    if shutil.which("nvidia-smi") is None:
        return None, 0
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None, 0
    return (out[0] if out else None), len(out)


def _free_disk(folder: Path) -> float | None:
    for candidate in (folder.resolve(), *folder.resolve().parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free / 2**30
    return None


def _host_memory() -> tuple[float | None, float | None]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None, None
    kib = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}
    total, available = kib.get("MemTotal"), kib.get("MemAvailable")
    return (None if total is None else total / 2**20), (None if available is None else available / 2**20)


# --- judgement --------------------------------------------------------------------------------

def version_tuple(text: str) -> tuple[int, ...]:
    """(2, 13, 0) of "2.13.0+cpu"; the leading numeric parts only."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def meets(version: str, requirement: str | None) -> bool:
    """`version` against ">=X" (the only form velotune's requirements use); True without one."""
    if not requirement or not requirement.startswith(">="):
        return True
    return version_tuple(version) >= version_tuple(requirement[2:])


def diagnose(facts: Facts) -> list[Check]:
    """Every check, in the order a user would fix them."""
    return [*_software(facts), *_gpu(facts), *_resources(facts), *_extras(facts)]


def _software(f: Facts) -> list[Check]:
    checks = [_required("Python", f.python, f.python_required,
                        f"use a Python {f.python_required} environment (e.g. uv venv --python 3.12)")]
    if f.torch is None:
        checks.append(Check("fail", "torch is not installed", "pip install torch (see pytorch.org for your CUDA)"))
        return checks
    build = f", CUDA {f.torch_cuda} build" if f.torch_cuda else ", CPU build"
    checks.append(_required("torch", f.torch, f.torch_required, f"pip install 'torch{f.torch_required}'", build))
    if f.triton_pinned and f.triton != f.triton_pinned:
        have = f"triton {f.triton} is installed" if f.triton else "triton is not installed"
        checks.append(Check("fail", f"{have}, but torch {f.torch} was built for triton {f.triton_pinned}",
                            f"pip install triton=={f.triton_pinned}"))
    elif f.triton:
        checks.append(Check("ok", f"triton {f.triton}" + (" (the one torch pins)" if f.triton_pinned else "")))
    elif f.cuda_available:
        checks.append(Check("warn", "triton is not installed: the fused kernels are off, training runs the slower "
                                    "PyTorch paths", "pip install 'velotune[kernels]'"))
    return checks


def _required(name: str, version: str, required: str | None, fix: str, detail: str = "") -> Check:
    """ok when `version` meets velotune's requirement, else a failure with `fix`."""
    if meets(version, required):
        return Check("ok", f"{name} {version}{detail}" + (f" (velotune needs {required})" if required else ""))
    return Check("fail", f"{name} {version}, velotune needs {required}", fix)


def _gpu(f: Facts) -> list[Check]:
    checks = []
    if f.driver and f.torch_cuda:
        cuda_major, driver_major = version_tuple(f.torch_cuda)[0], version_tuple(f.driver)[0]
        needed = MIN_DRIVER.get(cuda_major)
        if needed is not None and driver_major < needed:
            checks.append(Check("fail", f"NVIDIA driver {f.driver} is too old for torch's CUDA {f.torch_cuda} "
                                        f"(CUDA {cuda_major}.x needs driver {needed} or newer)",
                                f"update the driver to {needed}+, or install a torch built for an older CUDA"))
        else:
            checks.append(Check("ok", f"NVIDIA driver {f.driver} with torch's CUDA {f.torch_cuda}"))
    if not f.cuda_available:
        if f.smi_gpus:
            why = ("torch is a CPU build" if not f.torch_cuda else
                   f"CUDA_VISIBLE_DEVICES={f.visible_devices!r} hides them" if f.visible_devices is not None
                   else "see the driver check above")
            fix = ("install a CUDA build of torch (pytorch.org: pip install torch --index-url "
                   "https://download.pytorch.org/whl/cu128)" if not f.torch_cuda
                   else "unset or correct CUDA_VISIBLE_DEVICES")
            checks.append(Check("fail", f"nvidia-smi lists {f.smi_gpus} GPU(s) but torch cannot use them ({why})", fix))
        else:
            checks.append(Check("warn", "no CUDA GPU: training runs on the CPU (fine for the demo, slow for "
                                        "anything larger)", "train on a machine with an NVIDIA GPU"))
        return checks
    for index, gpu in enumerate(f.gpus):
        major, minor = gpu.capability
        text = f"GPU {index}: {gpu.name}, {gpu.memory_gib:.1f} GiB, compute capability {major}.{minor}"
        if major < 7 and f.kernels_enabled and f.triton:
            checks.append(Check("fail", f"{text}: the Triton kernels need compute capability 7.0 or newer",
                                "set VELOTUNE_KERNELS=0 to train with the PyTorch paths"))
        elif not gpu.bf16:
            checks.append(Check("warn", f"{text}: no bfloat16, so training runs float16 with loss scaling "
                                        "(a narrower range)",
                                "a GPU of compute capability 8.0+ (A100, L4, H100, RTX 30xx+)"))
        else:
            checks.append(Check("ok", f"{text}, bfloat16"))
    return checks


def _resources(f: Facts) -> list[Check]:
    checks = []
    if f.disk_free_gib is not None:
        text = f"{f.disk_free_gib:.1f} GiB free for checkpoints under {f.output_dir}"
        if f.disk_free_gib < DISK_FAIL_GIB:
            checks.append(Check("fail", text, "free disk space or set output_dir on a larger disk"))
        elif f.disk_free_gib < DISK_WARN_GIB:
            checks.append(Check("warn", text + " (a full fine-tune's checkpoint of an 8B model is ~100 GB)",
                                "use LoRA, save_total_limit, or a larger disk for output_dir"))
        else:
            checks.append(Check("ok", text))
    if f.host_available_gib is not None:
        text = f"host memory {f.host_available_gib:.1f} of {f.host_total_gib:.1f} GiB available"
        largest = max((g.memory_gib for g in f.gpus), default=0.0)
        if f.host_available_gib < HOST_WARN_GIB or f.host_available_gib < largest:
            checks.append(Check("warn", text + ": too little to offload much (offload_checkpoints, offload_embeddings "
                                               "and fsdp_cpu_offload keep tensors here)",
                                "leave those options off, or free host memory"))
        else:
            checks.append(Check("ok", text + " (room for offload_checkpoints and offload_embeddings)"))
    return checks


def _extras(f: Facts) -> list[Check]:
    checks = []
    if f.llama_cpp:
        checks.append(Check("ok", f"llama.cpp: {', '.join(f.llama_cpp)}"))
    else:
        checks.append(Check("note", "llama.cpp not found (only needed to run exported GGUF files; velotune writes "
                                    "them itself)", "install llama.cpp (github.com/ggml-org/llama.cpp releases) or "
                                                    "pip install llama-cpp-python"))
    if f.nccl is not None:
        shown = ", ".join(f"{k}={v}" for k, v in f.nccl_env.items()) or "no NCCL_* variables set"
        checks.append(Check("ok", f"NCCL {f.nccl} ({shown})"))
    elif len(f.gpus) > 1:
        checks.append(Check("warn", f"{len(f.gpus)} GPUs but no NCCL in this torch build: several GPUs cannot "
                                    "train together", "install a CUDA build of torch from pytorch.org"))
    else:
        checks.append(Check("note", "no NCCL in this torch build (only several GPUs need it; CPU ranks use gloo)"))
    interface = f.nccl_env.get("NCCL_SOCKET_IFNAME")
    if interface and f.interfaces and not socket_ifname_matches(interface, f.interfaces):
        checks.append(Check("fail", f"NCCL_SOCKET_IFNAME={interface} matches none of this machine's network "
                                    f"interfaces ({', '.join(f.interfaces)}): multi-GPU runs would hang at start",
                            "unset NCCL_SOCKET_IFNAME or name an interface listed here"))
    for name in SLOW_NCCL:
        if f.nccl_env.get(name) == "1":
            checks.append(Check("warn", f"{name}=1 slows every multi-GPU step", f"unset {name} unless debugging"))
    return checks


def socket_ifname_matches(value: str, interfaces: list[str]) -> bool:
    """Whether NCCL_SOCKET_IFNAME (comma-separated prefixes; "=" exact names; "^" excludes) leaves
    NCCL at least one interface."""
    exclude = value.startswith("^")
    body = value[1:] if exclude else value
    exact = body.startswith("=")
    names = [n for n in (body[1:] if exact else body).split(",") if n]
    picked = [i for i in interfaces if any(i == n if exact else i.startswith(n) for n in names)]
    return len(picked) < len(interfaces) if exclude else bool(picked)
