"""Shared fixtures for the transformer-denoiser methods: tiny DiT, PixArt and MMDiT pipelines.

tests/methods/conftest.py makes the pipeline fixtures visible to every method test module;
`on_model` points the contract's `tiny_pipe` / `tiny_spec` at one of them.
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


def model_fixtures(prefix: str, model: str) -> tuple[Any, Any]:
    """Session fixtures `<prefix>_spec` and `<prefix>_pipe`: a registered model's spec and its
    pipeline with random weights."""

    def spec() -> Any:
        from harness.models import MODELS

        return MODELS.get(model)

    def pipe() -> Any:
        from harness.models import MODELS, load_pipeline

        return load_pipeline(MODELS.get(model), "none", torch.float32, "cpu")

    return (pytest.fixture(scope="session", name=f"{prefix}_spec")(spec),
            pytest.fixture(scope="session", name=f"{prefix}_pipe")(pipe))


dit_spec, dit_pipe = model_fixtures("dit", "tiny-dit")  # adaLN-Zero blocks, class labels
pixart_spec, pixart_pipe = model_fixtures("pixart", "tiny-pixart")  # adaLN-single, cross-attn
sd3_spec, sd3_pipe = model_fixtures("sd3", "mini-sd3")  # mini-sd3's MMDiT (6 joint blocks)
flux_spec, flux_pipe = model_fixtures("flux", "tiny-flux")  # FLUX double + single blocks
tiny_sd3_spec, tiny_sd3_pipe = model_fixtures("tiny_sd3", "tiny-sd3")  # SD3.5: dual attention


ON_MODEL = {  # fixture prefix -> what the contract runs on
    "dit": "DiT's adaLN-Zero blocks (tiny-dit, class labels)",
    "pixart": "PixArt-alpha's adaLN-single blocks with cross-attention (tiny-pixart)",
    "sd3": "an MMDiT (mini-sd3's SD3 joint blocks, random weights)",
    "flux": "FLUX's double- and single-stream blocks (tiny-flux)",
    "tiny_sd3": "SD3.5's joint blocks with a dual-attention layer (tiny-sd3)",
}


def on_model(base: type, prefix: str) -> type:
    """`base`'s contract tests on another pipeline: its `<prefix>_pipe` / `<prefix>_spec`
    fixtures (import them into the test module) as the contract's `tiny_pipe` / `tiny_spec`."""

    class OnModel(base):  # type: ignore[misc, valid-type]
        @pytest.fixture()
        def tiny_pipe(self, request: Any) -> Any:
            return request.getfixturevalue(f"{prefix}_pipe")

        @pytest.fixture()
        def tiny_spec(self, request: Any) -> Any:
            return request.getfixturevalue(f"{prefix}_spec")

    OnModel.__doc__ = f"The same contract on {ON_MODEL[prefix]}."
    return OnModel


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
