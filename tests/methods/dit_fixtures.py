"""Shared fixtures for the transformer-denoiser methods: tiny DiT, PixArt and MMDiT pipelines.

Import the fixtures into a test module (`from tests.methods.dit_fixtures import dit_pipe, ...`)
and point the contract's `tiny_pipe` / `tiny_spec` at them inside the test class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from harness.run.generate import call_kwargs
from harness.steps import StepContext


@pytest.fixture(scope="session")
def dit_spec():
    from harness.models import MODELS

    return MODELS.get("tiny-dit")


@pytest.fixture(scope="session")
def dit_pipe(dit_spec):
    from harness.models import load_pipeline

    return load_pipeline(dit_spec, "none", torch.float32, "cpu")


@pytest.fixture(scope="session")
def pixart_spec():
    from harness.models import MODELS

    return MODELS.get("tiny-pixart")


@pytest.fixture(scope="session")
def pixart_pipe(pixart_spec):
    from harness.models import load_pipeline

    return load_pipeline(pixart_spec, "none", torch.float32, "cpu")


@pytest.fixture(scope="session")
def sd3_spec():
    from harness.models import MODELS

    return MODELS.get("mini-sd3")


@pytest.fixture(scope="session")
def sd3_pipe(sd3_spec):
    """mini-sd3's architecture (SD3 MMDiT, 6 joint blocks) with random weights."""
    from harness.models import load_pipeline

    return load_pipeline(sd3_spec, "none", torch.float32, "cpu")


@pytest.fixture(scope="session")
def flux_spec():
    from harness.models import MODELS

    return MODELS.get("tiny-flux")


@pytest.fixture(scope="session")
def flux_pipe(flux_spec):
    """FLUX's architecture at toy size: double- and single-stream blocks, guidance embedding."""
    from harness.models import load_pipeline

    return load_pipeline(flux_spec, "none", torch.float32, "cpu")


@pytest.fixture(scope="session")
def tiny_sd3_spec():
    from harness.models import MODELS

    return MODELS.get("tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3_pipe(tiny_sd3_spec):
    """SD3.5's architecture at toy size: joint blocks (one dual-attention), CLIP x2 + T5."""
    from harness.models import load_pipeline

    return load_pipeline(tiny_sd3_spec, "none", torch.float32, "cpu")


def pipe_kwargs(spec: Any, steps: int = 8, prompts: tuple[str, ...] = ("a red circle",)) -> dict:
    """Call arguments of one generation, seeds 1, 2, ... (latents where the pipeline allows)."""
    kwargs = call_kwargs(spec, list(prompts), [1 + i for i in range(len(prompts))], steps, 4.0,
                         32, {})
    kwargs["output_type"] = "latent"  # PixArt skips the VAE; DiT ignores it (float numpy)
    return kwargs


def generate_latents(pipe: Any, spec: Any, ctx: StepContext, steps: int = 8,
                     prompts: tuple[str, ...] = ("a red circle",)) -> torch.Tensor:
    """One generation under `ctx`: latents (PixArt) or float images (DiT) as a tensor."""
    with torch.inference_mode():
        return torch.as_tensor(ctx.generate(pipe, **pipe_kwargs(spec, steps, prompts)).images)


def plain_call(pipe: Any, spec: Any, steps: int = 8) -> torch.Tensor:
    """The same generation called directly, outside any StepContext."""
    with torch.inference_mode():
        return torch.as_tensor(pipe(**pipe_kwargs(spec, steps)).images)


def module_flops(pipe: Any, spec: Any, names: list[str]) -> int:
    """FLOPs of the named denoiser submodules (dotted paths) in one denoiser call.

    Counted over a 2-step generation and halved: PixArt's pipeline mishandles a single step.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from metrics.flops import register_attention_formulas

    register_attention_formulas()
    with FlopCounterMode(display=False) as counter:
        generate_latents(pipe, spec, StepContext(), steps=2)
    counts = counter.get_flop_counts()
    prefix = type(pipe.transformer).__name__
    total = sum(sum(counts[f"{prefix}.{name}"].values()) for name in names)
    assert total % 2 == 0
    return total // 2


@contextmanager
def count_calls(modules: dict[str, torch.nn.Module]) -> Iterator[Counter]:
    """Count real forward executions of each module (forward hooks fire only when it runs)."""
    counts: Counter = Counter()
    handles = [m.register_forward_hook(lambda *_, name=name: counts.update([name]))
               for name, m in modules.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def flops_of(pipe: Any, spec: Any, ctx: StepContext, steps: int = 8) -> int:
    """FLOPs of one whole generation under `ctx` (metrics.flops.count_flops)."""
    from metrics.flops import count_flops

    return count_flops(lambda: generate_latents(pipe, spec, ctx, steps))
