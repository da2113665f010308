"""FRDiff (So et al., arXiv 2312.03517): reuse residual-branch features between keyframes.

Every M-th denoising step (step 0 always) is a keyframe: the whole UNet runs and its residual
branches are cached per UNet call (CFG may batch or split calls): each Transformer2DModel's
output minus its input (the spatial transformer's residual branch) and each ResnetBlock2D's
conv1 output, taken before the time embedding is added so the block still sees the new timestep
(paper, "Feature Reuse"; the official code reuses exactly these two). On the other steps those
branches return their cached values while the rest of the UNet (norms, time embeddings, conv2,
samplers, skips, output head) runs on the new input: the FR score eps_FR. Score mixing (paper,
"Score Mixing"): a non-key step predicts lambda(r) eps_FR + (1 - lambda(r)) eps_jump, eps_jump
being the keyframe's prediction (reusing it is, for DDIM with eta 0, exactly the reduced-NFE
jump of M steps), r = step / num_steps, lambda(r) = clip((s (r - b) + 2) / 4, 0, 1), the official
code's schedule (s = 30): jump early for the coarse structure, reuse features late for details.
Where lambda(r) = 0 the UNet is not run at all. Deviations: the paper's Auto-FR search of
keyframes and lambda is not implemented (uniform keyframes, fixed schedule); the transformer
residual is recovered as output - input rather than before the residual add; UNet pipelines
only (the paper's DiT variant is not wired here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.cache import StepCache, cached_forward
from methods._common.unet import require_unet


@register_method("frdiff", touches=("unet.block_outputs", "denoiser.output"))
@dataclass(frozen=True)
class FRDiffConfig:
    """FRDiff keyframe interval and score-mixing schedule."""

    keyframe: int = param(2, "M: keyframe (full UNet) every M steps; 1 = never reuse",
                          low=1, high=1000)
    mix: bool = param(True, "score mixing with the keyframe (jump) prediction; "
                            "false = pure feature reuse (lambda = 1)")
    b: float = param(0.5, "lambda schedule: progress r = step / steps where lambda = 1/2",
                     low=0.0, high=1.0)
    slope: float = param(30.0, "lambda schedule slope s: lambda ramps 0 -> 1 over r in b +- 2/s",
                         low=0.1, high=1000.0)


def mix_weight(r: float, b: float = 0.5, slope: float = 30.0) -> float:
    """lambda(r) = clip((s (r - b) + 2) / 4, 0, 1): weight of the FR score (paper, Score Mixing)."""
    return min(1.0, max(0.0, (slope * (r - b) + 2.0) / 4.0))


def reused_modules(unet: Any) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, module, kind) of the residual branches FRDiff caches: transformers and conv1s."""
    out = [(name, mod, "transformer") for name, mod in unet.named_modules()
           if type(mod) is Transformer2DModel]
    out += [(f"{name}.conv1", mod.conv1, "conv1") for name, mod in unet.named_modules()
            if type(mod) is ResnetBlock2D]
    return out


def _sample(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    return (sample,) + tuple(out[1:]) if isinstance(out, tuple) else type(out)(sample=sample)


class _Reuse(StepCache):
    """Cached residual branches and keyframe predictions, per UNet call index within a step."""

    def __init__(self, config: FRDiffConfig, ctx: StepContext):
        super().__init__(ctx, lambda step, _: step % config.keyframe == 0, "sample")
        self.config = config
        self.jump: dict[int, tuple[torch.Size, Any]] = {}  # call -> (input shape, key output)
        self.keep_key = False

    def weight(self, step: int) -> float:
        """lambda of step `step`: 1 without mixing."""
        c = self.config
        return mix_weight(step / self.ctx.num_steps, c.b, c.slope) if c.mix else 1.0

    def _begin(self, sample: torch.Tensor) -> tuple[bool, float]:
        """Which call of which step this is: (non-key step, its lambda); sets `keep_key` (keep
        the keyframe's prediction) and `keep` (keep the residual branches)."""
        self.begin(sample)
        nonkey, self.reuse = self.reuse and self.call in self.jump, False  # reuse: in forward
        step, steps, m = self.ctx.step, self.ctx.num_steps, self.config.keyframe
        later = range(step + 1, min(steps, step - step % m + m)) if self.keep else ()
        # keep the residual branches only when a later non-key step reuses them (lambda > 0)
        self.keep_key, self.keep = self.keep, any(self.weight(s) > 0.0 for s in later)
        return nonkey, self.weight(step) if nonkey else 1.0

    def unet_forward(self, forward: Any) -> Any:
        def frdiff_forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            nonkey, lam = self._begin(sample)
            if nonkey and lam == 0.0:
                return self.jump[self.call][1]  # reduced NFE: the keyframe's prediction
            self.reuse = nonkey
            try:
                out = forward(sample, *args, **kwargs)
            finally:
                self.reuse = False
            if nonkey:
                if lam == 1.0:
                    return out
                eps_jump = _sample(self.jump[self.call][1])
                return _with_sample(out, lam * _sample(out) + (1.0 - lam) * eps_jump)
            if self.keep_key:
                self.jump[self.call] = (sample.shape, out)
            else:
                self.jump.pop(self.call, None)
            return out

        return frdiff_forward

    def transformer_forward(self, name: str, forward: Any) -> Any:
        def frdiff_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            residual = self.get(name)
            if residual is not None:
                out = hidden_states + residual
                if kwargs.get("return_dict", True):
                    return Transformer2DModelOutput(sample=out)
                return (out,)
            out = forward(hidden_states, *args, **kwargs)
            self.put(name, _sample(out) - hidden_states if self.keep else None)
            return out

        return frdiff_forward

    def clear(self) -> None:
        super().clear()
        self.jump.clear()


def apply(pipe: Any, config: FRDiffConfig, ctx: StepContext) -> MethodHandle:
    """Wrap the UNet (score mixing) and its transformers / resnet conv1s (feature reuse)."""
    unet = require_unet(pipe, "frdiff")
    handle = MethodHandle(pipe, "frdiff", config)
    if config.keyframe == 1:  # every step is a keyframe: nothing is ever reused or mixed
        return handle
    reuse = _Reuse(config, ctx)
    handle.swap_attr(unet, "forward", reuse.unet_forward(unet.forward))
    for name, module, kind in reused_modules(unet):
        wrapped = (reuse.transformer_forward(name, module.forward) if kind == "transformer"
                   else cached_forward(reuse, name, module.forward))
        handle.swap_attr(module, "forward", wrapped)
    handle.on_remove(reuse.clear)
    return handle
