"""T-GATE (Zhang et al., arXiv 2404.02747): cache cross-attention after the gate step, drop CFG.

Cross-attention converges in the first steps (paper Sec. 3), so inference splits into a
semantics-planning and a fidelity-improving phase (Sec. 4). At step `gate_step - 1` every
cross-attention (attn2) output is stored, averaged over the uncond and cond halves of the
classifier-free-guidance batch; from step `gate_step` on attn2 returns that cache instead of
being computed. Classifier-free guidance is dropped after the gate: a UNet pre-hook keeps only
the conditional half of the 2N batch and a forward hook returns its prediction twice, so the
pipeline's `uncond + g * (cond - uncond)` equals that prediction exactly and the pipeline code
is unchanged. Step numbering follows the reference code (gate_step = steps computed with
cross-attention). Optional self-attention caching as in the reference (tgate 1.0.0,
`tgate_scheduler`): in the semantics-planning phase (before the gate) attn1 is computed for
the first `warm_up` steps, stored at step `warm_up`, then recomputed and stored at steps
divisible by `plan_self_attn_interval` and reused in between (the reference's `sp_interval`);
the gate step stores its CFG-averaged attn1; after the gate attn1 is recomputed only at steps
divisible by `self_attn_interval` (its `fi_interval`) and reused in between. The reference's
defaults are gate_step 10, plan_self_attn_interval 5, warm_up 2, self_attn_interval 1; ours
keep self-attention uncached (gate only) unless asked. Steps come from the runner's context; a
pipeline call outside it runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.method import MethodHandle, register_method
from harness.params import param
from harness.steps import StepContext
from methods._common.cache import GenerationCache
from methods._common.unet import require_unet


@register_method("tgate", touches=("attention.cross", "guidance"))
@dataclass(frozen=True)
class TGateConfig:
    """T-GATE gate step and optional self-attention reuse before and after it."""

    gate_step: int = param(10, "first step that reuses the cached cross-attention and drops CFG "
                               "(the cache is taken at the step before; >= steps = off)",
                           low=1, high=100000)
    self_attn_interval: int = param(0, "after the gate, recompute self-attention only at steps "
                                       "divisible by k, reuse it in between (0 or 1 = off)",
                                    low=0, high=1000)
    plan_self_attn_interval: int = param(
        0, "before the gate, after `warm_up`, recompute self-attention only at steps divisible by "
        "k, reuse it in between (the reference's sp_interval, default there 5; 0 or 1 = off)",
        low=0, high=1000)
    warm_up: int = param(2, "steps before the gate that always compute self-attention; it is "
                         "first stored at this step (with plan_self_attn_interval > 1)",
                         low=0, high=100000)


def plan_action(step: int, config: TGateConfig) -> str:
    """Self-attention before the gate (reference `tgate_scheduler`): "compute", "store" (compute
    and keep for the next steps) or "reuse"."""
    k = config.plan_self_attn_interval
    if k <= 1 or step < config.warm_up:
        return "compute"
    return "store" if step == config.warm_up or step % k == 0 else "reuse"


def phase_of(step: int, num_steps: int, gate_step: int) -> str:
    """"plan" before the gate (or when gating is off), "gate" at the caching step, else "reuse"."""
    if not 0 <= step < num_steps or gate_step >= num_steps or step < gate_step - 1:
        return "plan"
    return "gate" if step == gate_step - 1 else "reuse"


def _halve(value: Any, batch: int) -> Any:
    """The conditional (second) half of a tensor whose leading dim is the 2N CFG batch."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value[batch // 2:]
    if isinstance(value, dict):
        return {k: _halve(v, batch) for k, v in value.items()}
    return value


class _Gate(GenerationCache):
    """Per-generation caches ((kind, block) -> output) and the phase of the UNet call."""

    def __init__(self, config: TGateConfig, ctx: StepContext, unet: Any):
        super().__init__(ctx)
        self.config, self.unet = config, unet
        self.phase, self.doubled, self.halved = "plan", False, False

    def before_unet(self, module: Any, args: tuple, kwargs: dict) -> tuple | None:
        """Pre-hook: set the phase; after the gate keep only the CFG batch's conditional half."""
        ctx = self.ctx
        self.new_generation()
        self.phase = phase_of(ctx.step, ctx.num_steps, self.config.gate_step)
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        cfg_batch = getattr(self.unet.config, "time_cond_proj_dim", None) is None
        self.doubled = ctx.guidance and cfg_batch and batch % 2 == 0
        self.halved = self.phase == "reuse" and self.doubled
        if not self.halved:
            return None
        return (tuple(_halve(a, batch) for a in args),
                {k: _halve(v, batch) for k, v in kwargs.items()})

    def after_unet(self, module: Any, args: tuple, output: Any) -> Any:
        """Forward hook: return the conditional prediction twice (uncond = cond, CFG is a no-op)."""
        if not self.halved:
            return None
        self.halved = False
        if isinstance(output, tuple):
            return (torch.cat([output[0], output[0]]),) + output[1:]
        return type(output)(sample=torch.cat([output.sample, output.sample]))

    def cached(self, key: tuple[str, str], forward: Any, fresh: Any,
               plan: Any = lambda step: "compute") -> Any:
        """Attention forward that stores its CFG-averaged output at the gate step and returns
        the stored output on reuse steps where `fresh(step)` is false (paper Sec. 4); before the
        gate `plan(step)` says whether to compute, compute and store, or reuse."""

        def gated(*args: Any, **kwargs: Any) -> torch.Tensor:
            step = self.ctx.step
            driven = 0 <= step < self.ctx.num_steps
            action = plan(step) if self.phase == "plan" and driven else "compute"
            if (self.phase == "reuse" and not fresh(step)) or action == "reuse":
                x = args[0] if args else kwargs["hidden_states"]
                hit = self.store.get(key)
                if hit is not None and hit.shape[:2] == x.shape[:2]:
                    return hit
            out = forward(*args, **kwargs)
            if self.phase == "gate":
                self.store[key] = self._cfg_mean(out)
            elif self.phase == "reuse" or action != "compute":
                self.store[key] = out
            return out

        return gated

    def _cfg_mean(self, out: torch.Tensor) -> torch.Tensor:
        """Average of the uncond and cond halves: the one branch left after the gate."""
        if not self.doubled:
            return out
        uncond, cond = out.chunk(2)
        return (uncond + cond) / 2

    def clear(self) -> None:
        super().clear()
        self.phase, self.doubled, self.halved = "plan", False, False


def attention_pairs(unet: Any) -> list[tuple[str, Any, Any]]:
    """(name, attn1, attn2) of every UNet transformer block that has cross-attention."""
    return [(n, m.attn1, m.attn2) for n, m in unet.named_modules()
            if getattr(m, "attn2", None) is not None and getattr(m, "attn1", None) is not None
            and getattr(m.attn2, "is_cross_attention", False)]


def apply(pipe: Any, config: TGateConfig, ctx: StepContext) -> MethodHandle:
    """Hook the UNet (phase, CFG halving) and wrap every attn2 (attn1 when it is cached)."""
    unet = require_unet(pipe, "tgate", "pipe.unet with cross-attention blocks", attention_pairs)
    pairs = attention_pairs(unet)
    handle = MethodHandle(pipe, "tgate", config)
    gate = _Gate(config, ctx, unet)
    # prepend: other methods' UNet hooks see the halved batch and the 2N output
    handle.add_hook(unet.register_forward_pre_hook(gate.before_unet, with_kwargs=True,
                                                   prepend=True))
    handle.add_hook(unet.register_forward_hook(gate.after_unet, prepend=True))
    interval = config.self_attn_interval
    for name, attn1, attn2 in pairs:
        handle.swap_attr(attn2, "forward",
                         gate.cached(("cross", name), attn2.forward, lambda step: False))
        if interval > 1 or config.plan_self_attn_interval > 1:
            handle.swap_attr(attn1, "forward", gate.cached(
                ("self", name), attn1.forward,
                lambda step: interval <= 1 or step % interval == 0,
                lambda step: plan_action(step, config)))
    handle.on_remove(gate.clear)
    return handle
