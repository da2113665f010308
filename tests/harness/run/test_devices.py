"""Device peak table, device names and the environment fingerprint."""

from __future__ import annotations

import pytest
import torch

import harness
import harness.run.devices as devices
from harness.run.devices import PEAKS, device_name, environment, find_peak, peak_tflops

KEYS = {"device_name", "device_count", "cuda", "driver", "torch", "diffusers", "transformers",
        "python", "diffbench", "git_sha"}


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.float16, 756.0),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA A100-SXM4-40GB", torch.float16, 312.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A10G", torch.float16, 125.0),
    ("NVIDIA L4", torch.bfloat16, 121.0),
    ("NVIDIA L40S", torch.float16, 362.05),
    ("NVIDIA GeForce RTX 4090", torch.float16, 165.2),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, 71.0),
    ("Tesla V100-SXM2-16GB", torch.float16, 125.0),
    ("Tesla T4", torch.float16, 65.0),
    ("Tesla T4", torch.bfloat16, None),
    ("AMD EPYC 7B13", torch.float32, None),
])
def test_peak_lookup(name, dtype, expected):
    assert peak_tflops(name, dtype) == expected


def test_float32_is_tf32_only_when_enabled():
    assert peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False) == 19.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == 156.0
    assert peak_tflops("Tesla V100-PCIE-16GB", torch.float32, tf32=True) == 14.0


def test_specific_rows_win_over_prefixes():
    assert find_peak("NVIDIA A10").match == "A10"
    assert find_peak("NVIDIA L40").match == "L40"
    assert find_peak("Tesla V100S-PCIE-32GB").match == "V100S"
    matches = [row.match for row in PEAKS]
    assert len(matches) == len(set(matches))


def test_environment_on_cpu():
    env = environment("cpu")
    assert set(env) == KEYS and all(isinstance(v, str) for v in env.values())
    assert env["device_name"] == device_name("cpu") != ""
    assert env["torch"] == torch.__version__ and env["diffbench"] == harness.__version__
    assert env["driver"] == "" and env["device_count"] == "1"


def test_git_sha_empty_outside_git(monkeypatch):
    monkeypatch.setattr(devices, "_run", lambda args, cwd=None: "")
    assert environment("cpu")["git_sha"] == ""
    monkeypatch.undo()
    assert devices._run(["definitely-not-a-command-xyz"]) == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_environment():
    env = environment("cuda")
    assert env["device_name"] == torch.cuda.get_device_name() and int(env["device_count"]) >= 1
