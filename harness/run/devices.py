"""Device names, per-device peak TFLOP/s (for MFU) and the environment fingerprint of a row."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense (no sparsity) peak TFLOP/s; None where the GPU has no such tensor-core path."""

    match: str  # substring of torch.cuda.get_device_name(), matched case-insensitively
    fp32: float  # non-tensor FP32
    tf32: float | None  # TF32 tensor core
    fp16: float  # FP16 tensor core, FP32 accumulate
    bf16: float | None  # BF16 tensor core, FP32 accumulate


# Most specific names first: the first row whose `match` is in the device name wins.
PEAKS: tuple[Peak, ...] = (
    # NVIDIA H100 datasheet (2023), H100 NVL column; sparse figures halved.
    Peak("H100 NVL", 60.0, 417.5, 835.5, 835.5),
    # NVIDIA H100 datasheet (2023), H100 PCIe column; sparse figures halved.
    Peak("H100 PCIe", 51.0, 378.0, 756.0, 756.0),
    # NVIDIA H100 datasheet (2023), H100 SXM column ("NVIDIA H100 80GB HBM3"); sparse halved.
    Peak("H100", 67.0, 494.7, 989.4, 989.4),
    # NVIDIA H200 datasheet (2024), H200 NVL column; sparse figures halved.
    Peak("H200 NVL", 60.0, 417.5, 835.5, 835.5),
    # NVIDIA H200 datasheet (2024), H200 SXM column; sparse figures halved.
    Peak("H200", 67.0, 494.7, 989.4, 989.4),
    # NVIDIA A100 datasheet (2021), 80GB SXM column ("NVIDIA A100-SXM4-80GB").
    Peak("A100-SXM4-80GB", 19.5, 156.0, 312.0, 312.0),
    # NVIDIA A100 datasheet (2021), 40GB SXM column ("NVIDIA A100-SXM4-40GB").
    Peak("A100-SXM4-40GB", 19.5, 156.0, 312.0, 312.0),
    # NVIDIA A100 datasheet (2021), PCIe columns: same peaks as SXM (lower sustained clocks).
    Peak("A100", 19.5, 156.0, 312.0, 312.0),
    # No NVIDIA datasheet for the AWS-only A10G: NVIDIA A10 datasheet (2021) figures, sparse
    # halved; treat MFU on A10G as approximate.
    Peak("A10G", 31.2, 62.5, 125.0, 125.0),
    # NVIDIA A10 datasheet (2021); sparse figures halved.
    Peak("A10", 31.2, 62.5, 125.0, 125.0),
    # NVIDIA L40S datasheet (2023); sparse figures halved.
    Peak("L40S", 91.6, 183.0, 362.05, 362.05),
    # NVIDIA L40 datasheet (2022); sparse figures halved.
    Peak("L40", 90.5, 90.5, 181.0, 181.0),
    # NVIDIA L4 datasheet (2023); sparse figures halved.
    Peak("L4", 30.3, 60.0, 121.0, 121.0),
    # NVIDIA Ada Lovelace architecture whitepaper v2.1, Table 2 (RTX 4090, FP32 accumulate).
    Peak("RTX 4090", 82.6, 82.6, 165.2, 165.2),
    # NVIDIA Ampere GA102 whitepaper v2.0, Table 9 (RTX 3090, FP32 accumulate).
    Peak("RTX 3090", 35.6, 35.6, 71.0, 71.0),
    # NVIDIA V100S datasheet (2019), PCIe.
    Peak("V100S", 16.4, None, 130.0, None),
    # NVIDIA V100 datasheet (2020), PCIe column ("Tesla V100-PCIE-16GB").
    Peak("V100-PCIE", 14.0, None, 112.0, None),
    # NVIDIA V100 datasheet (2020), SXM2 column ("Tesla V100-SXM2-16GB").
    Peak("V100", 15.7, None, 125.0, None),
    # NVIDIA T4 datasheet (2019): FP16 mixed precision 65; no TF32 or BF16 tensor cores.
    Peak("T4", 8.1, None, 65.0, None),
)


def find_peak(name: str) -> Peak | None:
    """The first table row whose `match` occurs in `name` (case-insensitive)."""
    lowered = name.lower()
    return next((row for row in PEAKS if row.match.lower() in lowered), None)


def peak_tflops(device_name: str, dtype: torch.dtype, tf32: bool | None = None) -> float | None:
    """Dense peak TFLOP/s of the device for `dtype`; None for a CPU or an unknown device.

    float32 counts as TF32 when `tf32` is true (default: torch's matmul TF32 switch) and the
    device has TF32 tensor cores, else as plain FP32.
    """
    row = find_peak(device_name)
    if row is None:
        return None
    if dtype == torch.float32:
        use_tf32 = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
        return row.tf32 if use_tf32 and row.tf32 is not None else row.fp32
    return {torch.float16: row.fp16, torch.bfloat16: row.bf16}.get(dtype)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else platform.processor() / platform.machine()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    """Human-readable name of `device`: the CUDA device name, or the CPU model."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def _run(args: list[str], cwd: str | None = None) -> str:
    """stdout of a short command, stripped; "" on any failure or after a 5 s timeout."""
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def nvidia_driver() -> str:
    """NVIDIA driver version from nvidia-smi, else /proc/driver/nvidia/version; "" if none."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return ""
    words = text.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), "")


def git_sha() -> str:
    """Commit of the checkout holding the harness package; "" when it is not a git checkout."""
    return _run(["git", "rev-parse", "HEAD"], cwd=str(Path(__file__).resolve().parent))


def _version(module: str) -> str:
    """Installed version of a distribution, "" when it is missing."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return ""


def environment(device: str) -> dict[str, str]:
    """Environment fingerprint recorded in every leaderboard row (all values are strings)."""
    import harness

    on_cuda = str(device).startswith("cuda")
    return {
        "device_name": device_name(device),
        "device_count": str(torch.cuda.device_count() if on_cuda else 1),
        "cuda": torch.version.cuda or "",
        "driver": nvidia_driver() if on_cuda else "",
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "diffbench": harness.__version__,
        "git_sha": git_sha(),
    }



DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str) -> None:
    """Refuse, before any work, a device torch cannot parse or this machine does not have."""
    from harness.errors import DiffbenchError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise DiffbenchError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N "
                             "or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DiffbenchError(f"device={name!r}: no CUDA device on this machine (torch "
                                 f"{torch.__version__}, {build}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DiffbenchError(f"device={name!r}: this machine has {count} CUDA device(s), "
                                 f"cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiffbenchError(f"device={name!r}: MPS is not available on this machine")
