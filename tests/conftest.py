"""Shared fixtures: one tiny-sd pipeline per test session (built offline in seconds)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_spec():
    from harness.models import MODELS

    return MODELS.get("tiny-sd")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_spec):
    from harness.models import load_pipeline

    return load_pipeline(tiny_spec, "none", torch.float32, "cpu")
