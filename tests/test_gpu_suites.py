"""Every cell of every GPU suite passes a CPU dry run (issue 12: the GPU path had never run).

The GPU suites are the suite files whose defaults say device = "cuda" (gpu-sd15, gpu-dit,
erasure-sd15-nudity, gpu-flux, gpu-sd35, and any added later). Two checks per suite, each over
every cell:

(a) FLOPs of one image under fake tensors at the suite's real size: the published architecture
    (SD-1.5, DiT-XL/2, FLUX.1-dev, SD3.5-medium), the suite's resolution, guidance and dtype
    (float16 / bfloat16: dtype mismatches fail under fake tensors as they would on the GPU), as
    `flops = "fake"` counts on a GPU.
    The model is built inside the fake mode (benchmarks/arch_flops.py `fake_pipeline`: no
    weights, under a second). The step count is the one concession to the time budget:
    counting costs ~0.3 s of Python dispatch per SD-1.5 step, so every cell at the suites' 50
    steps takes 100 s (gpu-sd15) + 55 s (gpu-dit), and ~1 s per step of FLUX.1-dev or SD3.5 at
    1024 px (one full 28-step FLUX cell: 27 s; every cell at full steps: 90 s gpu-flux, 100 s
    gpu-sd35); `python benchmarks/arch_flops.py --suite NAME` prints those. Here each cell
    runs STEPS steps, or 2 past its step-index parameters
    (STEP_INDEX_PARAMS: tgate's gate_step = 20 runs 22 steps, so the gated path runs too). A
    method that sets its own step count (solver: 20) runs that and is compared with the
    baseline at the cell's real step count. Baseline FLOPs are affine in the step count (every
    step has the same shapes), so two counts give the baseline at any step count exactly.
    Methods that skip compute must count fewer FLOPs than the baseline, SAME_COMPUTE methods
    (weight edits, feature scaling, quantised weights) exactly as many; GPU_ONLY cells (fp8
    matmuls) must be refused on the CPU in one line. Training methods get arch_flops'
    `structural_artifacts` (their trained weights' structure: training itself reads its losses
    with .item(), which fake tensors cannot answer).
(b) A generation of every cell on CPU at a tiny size: the suite loaded with
    `load_suite(name, overrides)` at device cpu, float32, 64 px, STEPS steps (more past step
    indices, as in (a)), one image, random weights; training methods' budgets cut to a few steps
    (TINY_BUDGET) and prepared; each cell's method applied, one image generated, removed. The
    model is the published architecture at reduced width (NARROW: the blocks, layer counts,
    attention layout, VAE depth and scheduler of SD-1.5 / DiT-XL/2 / FLUX.1-dev / SD3.5-medium,
    channels 32-64, text towers at their layer counts and width 32-64). Not the
    real size: SD-1.5 takes 13 s to build and its training methods minutes per step on this
    CPU. Not the registered tiny-sd / tiny-dit / tiny-flux / tiny-sd3: their layouts differ
    (two UNet levels; four DiT or FLUX blocks, three SD3 blocks, so gpu-dit's delta_dit
    num_blocks = 8 and block_drop drop_max = 8, gpu-flux's 16, gpu-sd35's 7 are refused there).
"""

from __future__ import annotations

import json
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.arch_flops import cell_flops, fake_pipeline
from harness.errors import DiffbenchError
from harness.models import MODELS, resolve_dtype
from harness.prepare import ArtifactCache, PrepareData, prepare_artifacts
from harness.prompts import load_prompts, looks_like_path
from harness.run.config import SUITES_DIR, Cell, load_suite
from harness.run.generate import call_kwargs, generate
from harness.seeds import image_seed
from harness.stack import resolve_method
from harness.steps import StepContext


def _device(path: Path) -> str:
    return str(tomllib.loads(path.read_text()).get("defaults", {}).get("device", ""))


# an attacked cell computes what its unattacked cell does (attacks: tests/attacks/), so the
# checks take every suite's cells without attacks; loading the suite validates its attacks
UNATTACKED = [{"name": "none"}]
GPU_SUITES = sorted(p.stem for p in SUITES_DIR.glob("*.toml") if _device(p).startswith("cuda"))
STEPS = 4  # deepcache / frdiff / fora (interval 3) reuse twice, block_drop (until 0.5) drops twice
STEP_INDEX_PARAMS = ("gate_step", "start_step")  # parameters naming a step: run 2 steps past
# methods scheduled by timestep ranges (100 < t < 800 ...): 4 steps of a shifted flow schedule
# (SD3.5: t = 1000, 858, 602, 9) hold one step inside and it is a computed one; 8 hold reuses
RANGE_METHODS = {"pab": 8, "fastercache": 8, "diffusers-pab": 8, "diffusers-fastercache": 8}
# the same FLOPs as the baseline: weight edits, feature scaling, quantised weights (torchao's
# int8 matmuls count as the float ones do)
SAME_COMPUTE = frozenset({"baseline", "skip_tuning", "esd", "sdd", "uce", "torchao"})
# cells only a GPU runs (torchao's float8 matmul: compute capability >= 8.9): on CPU both
# checks assert the method's one-line refusal instead
GPU_ONLY = {"torchao": ("fp8_weight_only", "fp8_dynamic")}
# training budgets of the generation check: int parameters of training methods, by name
TINY_BUDGET = {"steps": 2, "sample_steps": 2, "data_steps": 2, "data_size": 2, "batch_size": 2,
               "upper_every": 1}
TINY = {"device": "cpu", "dtype": "float32", "resolution": 64, "steps": STEPS, "n_images": 1,
        "batch_size": 1, "weights": "none"}


def test_the_gpu_suites_are_found():
    assert {"gpu-sd15", "gpu-dit"} <= set(GPU_SUITES)


def members(method: str) -> list[str]:
    return [m.name for m in getattr(resolve_method(method), "members", [resolve_method(method)])]


def gpu_only(cell: Cell) -> bool:
    return json.loads(cell.params).get("mode") in GPU_ONLY.get(cell.method, ())


def step_indices(params: Any) -> list[int]:
    """Values of STEP_INDEX_PARAMS anywhere in a cell's (possibly nested, stacked) params."""
    if not isinstance(params, dict):
        return []
    out = [v for k, v in params.items() if k in STEP_INDEX_PARAMS and isinstance(v, int)]
    return out + [i for v in params.values() for i in step_indices(v)]


def counted_steps(cell: Cell, at_most: int | None = None) -> int:
    """STEPS, or 2 past the cell's last step-index parameter, or RANGE_METHODS' count; at most
    `at_most`."""
    steps = max([STEPS, RANGE_METHODS.get(cell.method, 0)]
                + [i + 2 for i in step_indices(json.loads(cell.params))])
    return steps if at_most is None else min(steps, at_most)


# --- (a) FLOPs under fake tensors at the real size ------------------------------------------

@cache
def fake_model(model: str, dtype: str) -> tuple[Any, Any]:
    """(pipeline, fake mode) of the real architecture, shared by the suites of one model."""
    return fake_pipeline(MODELS.get(model), resolve_dtype(dtype))


class AffineBaseline:
    """The baseline's FLOPs at any step count, from exact counts at STEPS and STEPS + 1."""

    def __init__(self, cell: Cell, pipe: Any, mode: Any):
        counts = [cell_flops(pipe, cell, mode, steps=STEPS + k)[0] for k in range(2)]
        self.at_steps, self.per_step = counts[0], counts[1] - counts[0]
        assert self.per_step > 0, counts

    def __call__(self, steps: int) -> int:
        return self.at_steps + (steps - STEPS) * self.per_step


@pytest.mark.parametrize("suite", GPU_SUITES)
def test_flops_under_fake_tensors_at_real_size(suite):
    config = load_suite(suite, {"device": "cpu"}, attacks=UNATTACKED)
    baselines: dict[str, AffineBaseline] = {}
    for cell in config.cells:
        pipe, mode = fake_model(cell.model, cell.dtype)
        if cell.baseline_key not in baselines:
            base_cell = Cell(**{**cell.identity(), "method": "baseline", "params": "{}"})
            baselines[cell.baseline_key] = AffineBaseline(base_cell, pipe, mode)
        baseline = baselines[cell.baseline_key]
        steps = counted_steps(cell, cell.steps)
        if gpu_only(cell):
            with pytest.raises(DiffbenchError, match="CUDA GPU"):
                cell_flops(pipe, cell, mode, steps=steps)
            continue
        if cell.method == "baseline" and steps == STEPS:
            flops, ran = baseline(steps), steps  # counted above
        else:
            flops, ran = cell_flops(pipe, cell, mode, steps=steps)
        what = f"{suite}: {cell.method} {cell.params}"
        assert flops > 0, what
        if set(members(cell.method)) <= SAME_COMPUTE:
            assert flops == baseline(steps), what
        else:  # a method's own step count replaces the cell's: compare with the cell's steps
            reference = baseline(steps if ran == steps else cell.steps)
            assert flops < reference, f"{what}: {flops} FLOPs, baseline {reference}"


# --- (b) a generation of every cell at a tiny size on CPU -----------------------------------

def narrow_sd15() -> Any:
    """SD-1.5's pipeline at reduced width: its UNet blocks, 12-layer text tower, KL-f8 VAE,
    PNDM; channels 32-64 (UNet, VAE), text width 32."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.models.build import local_clip_tokenizer
    from harness.models.zoo import CLIP_COMMON, CLIP_L, SD15_UNET, SD_BETAS, SD_VAE

    unet = UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": (32, 64, 64, 64),
                                   "cross_attention_dim": 32, "sample_size": 8})
    text = CLIPTextModel(CLIPTextConfig(**CLIP_COMMON, **{
        **CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "projection_dim": 32}))
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**{**SD_VAE, "block_out_channels": (32, 32, 64, 64)}, sample_size=64),
        text_encoder=text, tokenizer=local_clip_tokenizer(77), unet=unet,
        scheduler=PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1,
                                set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def narrow_dit() -> Any:
    """DiT-XL/2's pipeline at reduced width: 28 adaLN-Zero blocks of 2 heads x 16, 8x8 latents
    (64 px images), KL-f8 VAE at channels 32-64, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from harness.models.zoo import DIT_BETAS, DIT_XL2_256, SD_VAE

    transformer = DiTTransformer2DModel(**{**DIT_XL2_256, "num_attention_heads": 2,
                                           "attention_head_dim": 16, "sample_size": 8})
    vae = AutoencoderKL(**{**SD_VAE, "block_out_channels": (32, 32, 64, 64)}, sample_size=64)
    return DiTPipeline(transformer=transformer, vae=vae,
                       scheduler=DDIMScheduler(**DIT_BETAS, clip_sample=False))


def _narrow_t5(width: int) -> Any:
    """T5-XXL's 24-layer encoder at `width` (2 heads x 16)."""
    from transformers import T5Config, T5EncoderModel

    from harness.models.zoo import T5_XXL

    return T5EncoderModel(T5Config(**{**T5_XXL, "d_model": width, "d_kv": 16, "d_ff": 2 * width,
                                      "num_heads": 2}))


def _narrow_clip(config: dict, with_projection: bool = False) -> Any:
    """A CLIP text tower of the zoo (its layer count, activation) at width 32."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from harness.models.zoo import CLIP_COMMON

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**CLIP_COMMON, **{
        **config, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "projection_dim": 32}))


NARROW_VAE = {"block_out_channels": (32, 32, 64, 64), "sample_size": 64}  # KL-f8, 16 latents


def narrow_flux() -> Any:
    """FLUX.1-dev's pipeline at reduced width: its 19 double + 38 single blocks of 2 heads x 16
    (guidance embedding), 12-layer CLIP-L and 24-layer T5 at widths 32, the FLUX VAE (KL-f8,
    16 latent channels, shift) at channels 32-64, its dynamically shifted flow-matching Euler."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    from harness.models import flow_zoo as fz
    from harness.models.build import local_clip_tokenizer, local_t5_tokenizer
    from harness.models.zoo import CLIP_L

    transformer = FluxTransformer2DModel(**{
        **fz.FLUX_DEV_TRANSFORMER, "num_attention_heads": 2, "attention_head_dim": 16,
        "axes_dims_rope": (4, 6, 6), "joint_attention_dim": 32, "pooled_projection_dim": 32})
    return FluxPipeline(
        scheduler=fz.flow_scheduler(fz.FLUX_DEV_SCHEDULE),
        vae=AutoencoderKL(**{**fz.FLUX_VAE, **NARROW_VAE}), text_encoder=_narrow_clip(CLIP_L),
        tokenizer=local_clip_tokenizer(77), text_encoder_2=_narrow_t5(32),
        tokenizer_2=local_t5_tokenizer(fz.FLUX_DEV_T5_TOKENS), transformer=transformer)


def narrow_sd35() -> Any:
    """SD3.5-medium's pipeline at reduced width: its 24 MMDiT-X blocks (dual attention in the
    first 13, QK RMS-norm) of 2 heads x 16, CLIP-L and bigG towers (12 / 32 layers) at width 32
    with projections, the 24-layer T5 at width 64, its VAE at channels 32-64, flow Euler."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    from harness.models import flow_zoo as fz
    from harness.models.build import local_clip_tokenizer, local_t5_tokenizer
    from harness.models.zoo import CLIP_L, OPENCLIP_BIGG

    transformer = SD3Transformer2DModel(**{
        **fz.SD35_MEDIUM_TRANSFORMER, "num_attention_heads": 2, "attention_head_dim": 16,
        "caption_projection_dim": 32, "joint_attention_dim": 64, "pooled_projection_dim": 64,
        "sample_size": 8})
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=fz.flow_scheduler(fz.SD35_SCHEDULE),
        vae=AutoencoderKL(**{**fz.SD35_VAE, **NARROW_VAE}),
        text_encoder=_narrow_clip(CLIP_L, True), tokenizer=local_clip_tokenizer(77),
        text_encoder_2=_narrow_clip(OPENCLIP_BIGG, True), tokenizer_2=local_clip_tokenizer(77),
        text_encoder_3=_narrow_t5(64), tokenizer_3=local_t5_tokenizer(fz.SD35_T5_TOKENS))


NARROW = {"sd15": narrow_sd15, "dit-xl-2": narrow_dit, "flux-dev": narrow_flux,
          "sd3.5-medium": narrow_sd35}


@cache
def narrow_model(model: str) -> Any:
    from harness.models.build import seeded

    assert model in NARROW, f"add a reduced-width build of {model} to NARROW"
    pipe = seeded(NARROW[model])
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_methods(suite: str) -> tuple[list[dict], str | None]:
    """The suite's [[methods]] with training budgets cut to TINY_BUDGET, and a prompt set in
    place of the suite's when that is a file not at hand (erasure-sd15-nudity: the I2P CSV)."""
    data = tomllib.loads((SUITES_DIR / f"{suite}.toml").read_text())
    out = []
    for entry in data.get("methods", []):
        params = dict(entry.get("params", {}))
        if resolve_method(entry["name"]).prepares:
            params = {k: TINY_BUDGET.get(k, v) if isinstance(v, int) else v
                      for k, v in params.items()}
        out.append({"name": entry["name"], "params": params})
    prompts = data.get("defaults", {}).get("prompts", "general")
    names = prompts if isinstance(prompts, list) else [prompts]
    missing = any(looks_like_path(n) and not Path(n).expanduser().exists() for n in names)
    return out, "general" if missing else None


def generate_cell(cell: Cell, pipe: Any) -> torch.Tensor:
    """One image of the cell, its method prepared (training methods) and applied."""
    spec, mspec = MODELS.get(cell.model), resolve_method(cell.method)
    config = mspec.config(json.loads(cell.params))
    prompt = load_prompts(cell.prompts, 1).prompts[0]
    artifacts = {}
    if mspec.prepares:
        data = PrepareData(model=f"{cell.model}@narrow", prompts=(prompt.text,), seed=cell.seed,
                           log=lambda _: None, dataset=spec.dataset)
        artifacts = prepare_artifacts(mspec, pipe, config, data, ArtifactCache(None))
    seed = prompt.seed if prompt.seed is not None else image_seed(cell.seed, 0)
    guidance = prompt.guidance if prompt.guidance is not None else cell.guidance
    ctx = StepContext()
    with mspec.apply(pipe, config, ctx, artifacts) as handle:
        kwargs = call_kwargs(spec, [prompt.text], [seed], counted_steps(cell), guidance,
                             cell.resolution, handle.call_kwargs)
        return generate(pipe, ctx, kwargs)  # raises on NaN / infinite pixels


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the block: the narrow models gain nothing from more, and two
    OpenMP threads on a busy shared 2-core machine made this check 100x slower (226 s, not 2 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("suite", GPU_SUITES)
def test_every_cell_generates_at_tiny_size_on_cpu(suite, one_thread):
    methods, prompts = tiny_methods(suite)
    config = load_suite(suite, {**TINY, **({"prompts": prompts} if prompts else {})}, methods,
                        UNATTACKED)
    assert len(config.cells) == len(methods)
    first = None
    for cell in config.cells:
        pipe = narrow_model(cell.model)
        if gpu_only(cell):
            with pytest.raises(DiffbenchError, match="CUDA GPU"):
                generate_cell(cell, pipe)
            continue
        images = generate_cell(cell, pipe)
        assert images.shape == (1, 64, 64, 3) and images.dtype == torch.uint8, cell.method
        if cell.method == "baseline":
            first = images if first is None else first
    baseline = next(c for c in config.cells if c.method == "baseline")
    assert torch.equal(generate_cell(baseline, narrow_model(baseline.model)), first), \
        "a method left the pipeline changed after remove()"
